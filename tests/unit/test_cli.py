"""Every `titanax` command, through typer's CliRunner."""

import os
import re

import pytest
from typer.testing import CliRunner

from titanax.launch.cli import app

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
