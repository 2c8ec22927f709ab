"""Every `titanax` command, through typer's CliRunner."""

import os
import re
import socket
import sys
import time

import pytest
from typer.testing import CliRunner

from titanax.launch.cli import app
from titanax.launch.runner import free_port

runner = CliRunner()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_schedule_prints_timeline_and_figures(tmp_path):
    png = tmp_path / "t.png"
    result = runner.invoke(
        app, ["schedule", "1f1b", "--stages", "2", "--microbatches", "3", "--png", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert "device 0 | F0 F1 .  .  B0 B0 F2 B1 B1 .  B2 B2" in result.output
    assert "ideal: time 12, bubble fraction 0.250" in result.output
    assert (
        "executed (every B split into B and W, one time unit per tick): time 11, "
        "bubble fraction 0.182" in result.output
    )
    assert "activations held per device (2, 1)" in result.output
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_schedule_errors_list_the_names():
    result = runner.invoke(app, ["schedule", "pipedream"])
    assert result.exit_code == 2
    assert "ScheduleError: schedule must be one of 'gpipe', '1f1b'" in result.output


def test_mesh_shows_the_grid():
    result = runner.invoke(app, ["mesh", "data=2", "model=4"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "mesh data=2 x model=4 (8 devices)"
    assert lines[2].split() == ["0", "1", "2", "3", "data=0"]
    assert lines[3].split() == ["4", "5", "6", "7", "data=1"]
    bad = runner.invoke(app, ["mesh", "data=3"])
    assert bad.exit_code == 2 and "MeshError" in bad.output and "try tx.mesh(data=-1)" in bad.output


def test_explain_an_example_without_training():
    config = os.path.join(ROOT, "examples", "mnist_dp", "config.yaml")
    result = runner.invoke(app, ["explain", config, "--set", "hidden=32"])
    assert result.exit_code == 0, result.output
    assert "data_parallel(axis='data') on mesh (data=8); manual axes: data" in result.output
    assert re.search(r"state/params/dense0/kernel +\(64, 32\)", result.output)
    assert "all-reduce  data" in result.output
    missing = runner.invoke(app, ["explain", "nowhere/config.yaml"])
    assert missing.exit_code == 2 and "train.py beside it" in missing.output
    bad_key = runner.invoke(app, ["explain", config, "--set", "hiden=32"])
    assert bad_key.exit_code == 2 and "ConfigError" in bad_key.output


@pytest.mark.parametrize("fail_rank, code", [(None, 0), (1, 3)])
def test_launch_prefixes_ranks_and_returns_the_first_failure(tmp_path, fail_rank, code):
    script, printed = tmp_path / "job.py", tmp_path / "printed"
    # The failing rank exits once rank 0 has printed (it leaves a file): else the launcher
    # may stop rank 0 before it prints, and its line is missing.
    script.write_text(
        "import os, sys, time\n"
        "rank = int(os.environ['TITANAX_PROCESS_ID'])\n"
        "print('hello from', rank, 'of', os.environ['TITANAX_NUM_PROCESSES'], "
        "os.environ['TITANAX_COORDINATOR'].startswith('127.0.0.1:'), sys.argv[1:], flush=True)\n"
        f"if rank == 0: open({str(printed)!r}, 'w').close()\n"
        f"while rank == {fail_rank} and not os.path.exists({str(printed)!r}):\n"
        "    time.sleep(0.01)\n"
        f"sys.exit(3 if rank == {fail_rank} else 0)\n"
    )
    result = runner.invoke(app, ["launch", "--nproc", "2", "--grace", "1", str(script), "--x", "1"])
    assert result.exit_code == code, result.output
    for rank in (0, 1):
        assert f"[{rank}] hello from {rank} of 2 True ['--x', '1']" in result.output
    if fail_rank is not None:
        assert "[launch] DistributedError: process 1 exited with code 3" in result.output


@pytest.mark.parametrize(
    "axes, error",
    [
        # Before: the last size won silently (a 4 x 2 grid).
        (
            ["data=2", "data=4", "model=2"],
            "MeshError: axis 'data' is given twice (data=2, then "
            "data=4); give each axis once, e.g. data=4.",
        ),
        (["data=2,model=4,data=2"], "MeshError: axis 'data' is given twice"),
        (["data"], "MeshError: axis 'data' must look like name=size, e.g. data=2 (or data=-1)."),
        (["=8"], "MeshError: axis '=8' must look like name=size"),
        (["data=two"], "MeshError: axis 'data=two': the size must be an integer"),
        (["daté=8"], "MeshError: tx.mesh(daté=8): axis name 'daté' has 'é', which XLA cannot take"),
    ],
)
def test_mesh_axis_mistakes_are_one_line_mesh_errors(axes, error):
    result = runner.invoke(app, ["mesh", *axes])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(error), result.output
    assert result.output.count("\n") == 1, result.output  # one line, no traceback


def test_mesh_takes_comma_separated_axes():
    result = runner.invoke(app, ["mesh", "data=2,model=4"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "mesh data=2 x model=4 (8 devices)"


def test_schedule_png_without_matplotlib_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    result = runner.invoke(app, ["schedule", "1f1b", "--png", str(tmp_path / "t.png")])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1].startswith(
        f"ScheduleError: --png {tmp_path / 't.png'}: drawing the timeline needs matplotlib, "
        "which is not installed"
    )
    assert "Traceback" not in result.output


@pytest.fixture
def hello(tmp_path):
    script = tmp_path / "hello.py"
    script.write_text("print('hello')\n")
    return str(script)


@pytest.mark.parametrize("busy", [0, 1])  # the coordinator's port, the start-up check's
def test_launch_on_a_port_in_use_is_a_clear_error_at_once(hello, busy):
    # Before: a port P in use crashed process 0 in JAX (SIGSEGV) or timed out after 60 s;
    # P + 1 in use was a raw OSError from process 0.
    port = free_port()
    with socket.create_server(("127.0.0.1", port + busy)):
        start = time.monotonic()
        result = runner.invoke(app, ["launch", "--nproc", "2", "--port", str(port), hello])
    assert time.monotonic() - start < 5
    assert result.exit_code == 2, result.output
    role = "JAX's coordinator" if busy == 0 else "Titanax's start-up check"
    assert result.output == (
        f"DistributedError: titanax launch: --port {port}: port {port + busy}, for {role}, is "
        f"in use ([Errno 98] Address already in use); the job needs ports {port} and "
        f"{port + 1} free. Choose another --port, or leave it out to get a free pair.\n"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--port", "70000"],
            "--port 70000: choose a port in 1 .. 65534 (the next one is used too)",
        ),
        (["--exit-timeout", "0"], "timeouts are seconds above 0"),
        (["--hang-timeout", "-1"], "timeouts are seconds above 0"),
        (["--grace", "-1"], "timeouts are seconds above 0"),
    ],
)
def test_launch_arguments_that_cannot_work_are_one_line_errors(hello, args, message):
    result = runner.invoke(app, ["launch", "--nproc", "2", *args, hello])
    assert result.exit_code == 2, result.output
    assert (
        result.output.startswith("DistributedError: titanax launch: ") and message in result.output
    )
    assert len(result.output.splitlines()) == 1


def test_launch_options_end_at_the_script(tmp_path, hello):
    # Before: an unknown option before SCRIPT became the script (`python --devices ...`);
    # a missing script failed in every process.
    result = runner.invoke(app, ["launch", "--devices", "0", "--nproc", "2", hello])
    assert result.exit_code == 2 and "No such option: --devices" in result.output
    assert "--devices-per-process" in result.output  # click's suggestion
    missing = runner.invoke(app, ["launch", "--nproc", "2", str(tmp_path / "nowhere.py")])
    assert missing.exit_code == 2
    assert missing.output.startswith(
        f"DistributedError: titanax launch: SCRIPT '{tmp_path / 'nowhere.py'}' does not exist"
    )
    # After SCRIPT, everything is the script's own, titanax launch's option names too.
    echo = tmp_path / "echo.py"
    echo.write_text("import sys; print(sys.argv[1:])\n")
    result = runner.invoke(app, ["launch", "--nproc", "1", str(echo), "--nproc", "3", "-x"])
    assert result.exit_code == 0 and "[0] ['--nproc', '3', '-x']" in result.output
