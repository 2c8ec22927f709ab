"""The ``titanax`` command line (typer)."""

from __future__ import annotations

from typing import Annotated

import typer

from titanax.launch.runner import launch as _launch

app = typer.Typer(
    help="Titanax: explicit parallelism for JAX.", no_args_is_help=True, add_completion=False
)


@app.callback()
def main() -> None:
    """Titanax: explicit parallelism for JAX."""


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(
    ctx: typer.Context,
    script: Annotated[str, typer.Argument(help="the Python script every process runs")],
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="number of processes")] = 1,
    devices_per_process: Annotated[
        int | None,
        typer.Option("--devices-per-process", min=1, help="simulated CPU devices in each process"),
    ] = None,
    port: Annotated[int | None, typer.Option(help="coordinator port (default: a free one)")] = None,
    grace: Annotated[float, typer.Option(help="seconds between SIGTERM and SIGKILL")] = 10.0,
) -> None:
    """Run SCRIPT [ARGS...] as NPROC processes on 127.0.0.1, joined by JAX's runtime.

    Output lines are prefixed with the rank. If one process fails, the others are
    stopped; the exit code is the first failure's.
    """
    code = _launch(
        script,
        list(ctx.args),
        nproc=nproc,
        devices_per_process=devices_per_process,
        port=port,
        grace_s=grace,
    )
    raise typer.Exit(code)


if __name__ == "__main__":
    app()
