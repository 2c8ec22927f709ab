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


# Options end at SCRIPT: everything after it is the script's own (`--steps 20`), even a
# name titanax launch also has; an unknown option before it is an error, not an argument.
@app.command(context_settings={"allow_extra_args": True, "allow_interspersed_args": False})
def launch(
    ctx: typer.Context,
    script: Annotated[str, typer.Argument(help="the Python script every process runs")],
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="number of processes")] = 1,
    devices_per_process: Annotated[
        int | None,
        typer.Option(
            "--devices-per-process",
            min=1,
            help="simulated CPU devices in each process (default: as each process sets up; a "
            "mesh must hold an equal share of every process's devices)",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="coordinator port P; P + 1 is used too (default: a free pair)"),
    ] = None,
    grace: Annotated[float, typer.Option(help="seconds between SIGTERM and SIGKILL")] = 10.0,
    exit_timeout: Annotated[
        float,
        typer.Option(
            help="once a process has ended, seconds the others may run on before the job is "
            "stopped (one that finished early leaves the others waiting in a collective)"
        ),
    ] = 45.0,
    hang_timeout: Annotated[
        float,
        typer.Option(
            help="stop the job when a process completes no Titanax step for this many seconds, "
            "counted from the first step any process completes (0: never)"
        ),
    ] = 600.0,
    all_progress: Annotated[
        bool,
        typer.Option(help="show every process's progress bars (default: process 0's only)"),
    ] = False,
) -> None:
    """Run SCRIPT [ARGS...] as NPROC processes on 127.0.0.1, joined by JAX's runtime.

    Output lines are prefixed with the rank (JAX's gloo connection messages are left
    out). If one process fails, the others are stopped at once; the exit code is the first
    failure's. A signal to the launcher, a process that ends while the others still run
    (--exit-timeout) and a process that stops making progress (--hang-timeout) stop the
    whole job too: no process is left behind.
    """
    from titanax.errors import TitanaxError

    try:
        code = _launch(
            script,
            list(ctx.args),
            nproc=nproc,
            devices_per_process=devices_per_process,
            port=port,
            grace_s=grace,
            exit_timeout_s=exit_timeout,
            hang_timeout_s=hang_timeout or None,
            all_progress=all_progress,
        )
    except TitanaxError as e:
        _fail(e)
    raise typer.Exit(code)


def _fail(error: Exception) -> None:
    typer.echo(f"{type(error).__name__}: {error}", err=True)
    raise typer.Exit(2)


def _simulate(devices: int) -> None:
    """Simulated CPU devices for commands that build meshes (before JAX starts)."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError:  # JAX already started (e.g. the command runs inside a test)
        pass


@app.command()
def schedule(
    name: Annotated[
        str,
        typer.Argument(help="gpipe, 1f1b, interleaved_1f1b, zero_bubble or zero_bubble_v"),
    ],
    stages: Annotated[int, typer.Option(help="devices along the pipeline axis")] = 4,
    microbatches: Annotated[int, typer.Option(help="microbatches per step")] = 8,
    virtual_stages: Annotated[
        int, typer.Option(help="stages per device (interleaved_1f1b: 2 or more; zero_bubble_v: 2)")
    ] = 1,
    png: Annotated[str | None, typer.Option(help="also draw the timeline to this PNG")] = None,
) -> None:
    """Print a pipeline schedule's timeline and its bubble and memory figures."""
    from titanax.errors import ScheduleError, TitanaxError
    from titanax.parallel import schedules

    try:
        s = schedules.get(
            name, stages=stages, microbatches=microbatches, virtual_stages=virtual_stages
        )
    except TitanaxError as e:
        _fail(e)
    typer.echo(s.render())
    unit = "per stage chunk, " if virtual_stages > 1 else ""
    held = "stage-chunk activations" if virtual_stages > 1 else "activations"
    how = (
        "as written: no tick mixes a forward with a whole backward"
        if s.executed is s and not s.split_backward
        else "every B split into B and W, one time unit per tick"
    )
    typer.echo(
        f"\n{name}: stages={stages}, microbatches={microbatches}, virtual_stages="
        f"{virtual_stages}, placement {s.placement!r}\nideal: time {s.total_time}, bubble "
        f"fraction {s.bubble_fraction:.3f} (time units {unit}F=1, B=2"
        f"{', B=W=1 split' if s.split_backward else ''})\nexecuted ({how}): time "
        f"{s.lockstep_time}, bubble fraction "
        f"{s.lockstep_bubble_fraction:.3f}\n{held} held per device {s.peak_in_flight}"
    )
    if png:
        try:
            s.render_png(png)
        except ImportError as e:
            _fail(
                ScheduleError(
                    f"--png {png}: drawing the timeline needs matplotlib, which is not installed "
                    f"({e}). Install it (pip install matplotlib), or leave --png out."
                )
            )
        except OSError as e:
            _fail(ScheduleError(f"--png {png}: the file could not be written ({e})."))
        typer.echo(f"timeline drawn to {png}")


@app.command()
def mesh(
    axes: Annotated[
        list[str], typer.Argument(help="axis=size pairs in order, e.g. data=2 model=4")
    ],
    devices: Annotated[int, typer.Option(help="simulated CPU devices")] = 8,
) -> None:
    """Show the device grid tx.mesh(...) builds: which device sits where."""
    _simulate(devices)
    import numpy as np

    import titanax as tx
    from titanax.mesh import parse_axes

    try:  # name=size items (or data=2,model=4); an axis given twice is an error
        m = tx.mesh(None, **parse_axes([a for item in axes for a in item.split(",") if a]))
    except tx.TitanaxError as e:
        _fail(e)
    names = m.axis_names
    typer.echo(
        "mesh " + " x ".join(f"{a}={m.shape[a]}" for a in names) + f" ({m.devices.size} devices)"
    )
    grid = np.vectorize(
        lambda d: f"{d.id}" + (f"@p{d.process_index}" if jax_processes() > 1 else "")
    )(m.devices)
    grid = grid.reshape(-1, grid.shape[-1]) if grid.ndim > 1 else grid.reshape(1, -1)
    lead = names[:-1]
    typer.echo(f"rows: {' x '.join(lead) if lead else '-'}; columns: {names[-1]}")
    for r, row in enumerate(grid):
        label = (
            ""
            if not lead
            else "  "
            + ",".join(f"{a}={i}" for a, i in zip(lead, np.unravel_index(r, m.devices.shape[:-1])))
        )
        typer.echo(" ".join(f"{c:>4}" for c in row) + label)


def jax_processes() -> int:
    import jax

    return jax.process_count()


@app.command()
def explain(
    config: Annotated[str, typer.Argument(help="an example's config.yaml (train.py beside it)")],
    overrides: Annotated[list[str] | None, typer.Option("--set", help="key.path=value")] = None,
    devices: Annotated[int, typer.Option(help="simulated CPU devices")] = 8,
) -> None:
    """Print the layout table and the collectives of an example's step, without training.

    CONFIG is a YAML config; the ``train.py`` beside it defines ``Config`` and
    ``build(config) -> (step, args)``.
    """
    _simulate(devices)
    import importlib.util
    import os
    import sys

    from titanax.errors import TitanaxError
    from titanax.launch.config import load

    script = os.path.join(os.path.dirname(os.path.abspath(config)), "train.py")
    if not os.path.exists(config) or not os.path.exists(script):
        _fail(FileNotFoundError(f"{config}: need a config file with a train.py beside it"))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(script))))
    sys.path.insert(0, root)  # examples import each other as `examples.*`
    spec = importlib.util.spec_from_file_location("titanax_explained", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    if not hasattr(module, "build") or not hasattr(module, "Config"):
        _fail(AttributeError(f"{script} defines no Config and build(config)"))
    try:
        cfg = load(module.Config, config, overrides or [])
        step, args = module.build(cfg)
        typer.echo(step.explain(*args))
    except TitanaxError as e:
        _fail(e)


if __name__ == "__main__":
    app()
