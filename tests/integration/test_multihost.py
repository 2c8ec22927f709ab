"""Several processes on loopback, launched by `titanax launch` (gloo collectives on CPU)."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import optax
import pytest

import titanax as tx
from examples.mnist_dp import train as mnist
from tests.integration.examples_run import ENV, ROOT, SMALL_GPT, launch, run


def losses(path):
    return [json.loads(line)["loss"] for line in open(path)]


def titanax_launch(*args, timeout=300):
    """``titanax launch ARGS`` from the repository root, as typed; the CompletedProcess."""
    cmd = [sys.executable, "-m", "titanax.launch.cli", "launch", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def mnist_runs(tmp_path_factory):
    """The MNIST example, 20 steps, launched on 2 processes and run in 1, each writing its
    losses and its final checkpoint: the two tests below read them (one launch, not two)."""
    tmp = tmp_path_factory.mktemp("mnist")

    def args(name):
        out = ["--metrics", str(tmp / f"{name}.jsonl"), "--checkpoint-dir", str(tmp / name)]
        return ["examples/mnist_dp/train.py", "--steps", "20", *out]

    # No --devices-per-process: the example gives each process half of its 8 devices.
    done = titanax_launch("--nproc", "2", *args("two"))
    if done.returncode == 0:
        run(*args("one"))
    return tmp, done


def test_mnist_on_2_processes_equals_1_process(mnist_runs):
    tmp, done = mnist_runs
    assert done.returncode == 0, done.stdout[-3000:]
    assert "[launch] rank 1: pid " in done.stdout and "[0] final loss" in done.stdout
    assert "[1] " not in done.stdout  # reported once, by process 0 (and no gloo lines)
    # What reaches the screen: no gloo connection messages (16 lines before), and the bar
    # of process 0 only, as lines: its first state, one every 30 s, and its last (before:
    # each redraw a line, 60 for the example's 300 steps).
    assert "Gloo" not in done.stdout and "peer ranks" not in done.stdout
    bars = [line for line in done.stdout.splitlines() if "train:" in line]
    assert all(line.startswith("[0] train: ") for line in bars), bars
    minutes, seconds = re.search(r"\[(\d+):(\d+)<", bars[-1]).groups()
    assert "20/20" in bars[-1] and 2 <= len(bars) <= 2 + (60 * int(minutes) + int(seconds)) // 30
    two, one = losses(tmp / "two.jsonl"), losses(tmp / "one.jsonl")
    assert len(two) == len(one) == 20
    assert np.max(np.abs(np.subtract(two, one))) < 1e-5


@pytest.mark.parametrize("zero", ["0", "3"])  # data_parallel, fully_sharded: data spans processes
def test_dp_x_tp_on_2_processes_equals_1_process(tmp_path, zero):
    args = ["--mesh", "data=2,model=4", *SMALL_GPT, "--steps", "4", "--zero", zero]
    done = launch(
        2, "examples/gpt_small_tp/train.py", *args, "--metrics", str(tmp_path / "two.jsonl")
    )
    assert done.returncode == 0, done.stdout[-3000:]
    run("examples/gpt_small_tp/train.py", *args, "--metrics", str(tmp_path / "one.jsonl"))
    two, one = losses(tmp_path / "two.jsonl"), losses(tmp_path / "one.jsonl")
    assert len(two) == 4 and np.max(np.abs(np.subtract(two, one))) < 1e-5


def test_checkpoint_from_2_processes_restores_in_1_on_another_mesh(mnist_runs):
    tmp, done = mnist_runs
    assert done.returncode == 0, done.stdout[-3000:]
    mngr = tx.checkpoint.Manager(tmp / "two")
    assert mngr.metadata()["process_count"] == 2
    params = mnist.init_params(jax.random.key(0), (64, 128, 128, 10))
    state = tx.TrainState.create(params, optax.adam(1e-3))
    mesh = tx.mesh(devices=jax.devices()[:4], data=2, model=2)  # another mesh, one process
    like = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    restored = mngr.restore(like=like)
    assert int(restored.step) == 20
    one_device = mngr.restore(like=jax.device_put(state, jax.devices()[0]))
    reference = tx.checkpoint.Manager(tmp / "one").restore(like=like)
    for a, b, c in zip(*map(jax.tree.leaves, (restored, one_device, reference))):
        assert a.sharding == like.params["dense0"]["kernel"].sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # both meshes: same bits
        # the single-process run: gloo sums in another order, so equal to float rounding
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-7)


def test_killed_process_stops_the_launch_within_60_s(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "titanax.launch.cli",
        "launch",
        "--nproc",
        "2",
        "--devices-per-process",
        "4",
        "--grace",
        "5",
        "examples/mnist_dp/train.py",
        "--steps",
        "1000000",
    ]
    proc = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    pids, output = {}, []
    try:
        for line in proc.stdout:  # wait until both run and train
            output.append(line)
            if m := re.match(r"\[launch\] rank (\d+): pid (\d+)", line):
                pids[int(m.group(1))] = int(m.group(2))
            if "train:" in line and "step/s" in line:
                break
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        rest, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    output.append(rest)
    text = "".join(output)
    assert proc.returncode != 0
    assert elapsed < 60
    assert "DistributedError: process 1 was killed by SIGKILL" in text
    for pid in pids.values():  # nothing left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


UNREACHABLE = textwrap.dedent("""
    import titanax as tx
    try:
        tx.distributed.initialize(timeout_s=3)
    except tx.DistributedError as e:
        print("DistributedError:", e)
        raise SystemExit(3)
""")


@pytest.mark.parametrize(
    "process_id, message",
    [
        (1, "could not be reached within 3 s"),  # process 0 never started
        (0, "1 of 2 processes joined within 3 s; process_id 1 never came"),
    ],  # a wrong count
)
def test_start_up_failures_are_clear_errors(process_id, message):
    port = __import__("titanax.launch.runner", fromlist=["free_port"]).free_port()
    env = {
        **ENV,
        "TITANAX_COORDINATOR": f"127.0.0.1:{port}",
        "TITANAX_NUM_PROCESSES": "2",
        "TITANAX_PROCESS_ID": str(process_id),
        "JAX_PLATFORMS": "cpu",
    }
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", UNREACHABLE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stdout + done.stderr[-2000:]
    seen = f"coordinator='127.0.0.1:{port}', num_processes=2, process_id={process_id}"
    assert seen in done.stdout and message in done.stdout
    assert time.monotonic() - start < 60


DIFFERENT_ROWS = textwrap.dedent("""
    import numpy as np
    import titanax as tx

    tx.distributed.initialize(heartbeat_s=10)
    import jax

    step = tx.data_parallel(
        lambda w, x: w - tx.pmean(x.mean(), "data"), mesh=tx.mesh(data=-1), donate=False
    )
    rank = jax.process_index()
    try:  # process 0 passes 4 rows of ones, process 1 2 rows of twos
        print("update", float(step(np.float32(0), np.full((4 - 2 * rank, 3), rank + 1, np.float32))))
    except tx.DistributedError as e:
        print("DistributedError:", e)
    print("then", float(step(np.float32(0), np.full((4, 3), rank + 1, np.float32))))  # equal rows
    forgot = tx.data_parallel(lambda w, x: w - x.mean(), mesh=tx.mesh(data=-1), donate=False)
    try:  # no tx.pmean: each process only sees its own shards, the program says it all
        print("forgot", float(forgot(np.float32(0), np.ones((4, 3), np.float32))))
    except tx.PlanError as e:
        print("PlanError:", str(e).splitlines()[0])
""")


@pytest.mark.slow
def test_processes_that_pass_batches_of_different_shapes(tmp_path):
    # Unchecked, each process compiled its own global shape: the update was -1.5 where the
    # mean over the 6 rows is -1.333, and no error.
    (tmp_path / "rows.py").write_text(DIFFERENT_ROWS)
    done = titanax_launch("--nproc", "2", "--devices-per-process", "2", str(tmp_path / "rows.py"))
    assert done.returncode == 0, done.stdout[-3000:]
    assert "update" not in done.stdout
    for rank in (0, 1):  # the same error on each process
        assert (
            f"[{rank}] DistributedError: step '<lambda>': the processes passed batches of "
            "different shapes to its first call with these arguments:\n"
            f"[{rank}]   * argument 1 (x): process 0: (4, 3) float32; process 1: (2, 3) float32"
        ) in done.stdout
        assert f"[{rank}] then -1.5" in done.stdout  # the next call compares afresh
        # A forgotten reduction across processes: decided from the program on each process
        # (the old value check compared only the shards a process could address).
        assert f"[{rank}] PlanError: data_parallel(axis='data'): 1 output leaf differs" in (
            done.stdout
        )
        assert f"[{rank}] forgot" not in done.stdout


NEVER_CALLS = textwrap.dedent("""
    import time
    import numpy as np
    import titanax as tx

    tx.distributed.initialize(heartbeat_s=10, check_timeout_s=3)
    import jax

    step = tx.data_parallel(
        lambda w, x: w - tx.pmean(x.mean(), "data"), mesh=tx.mesh(data=-1), donate=False
    )
    if jax.process_index() == 0:  # process 1 never calls the step
        start = time.monotonic()
        try:
            step(np.float32(0), np.ones((2, 3), np.float32))
        except tx.DistributedError as e:
            print(f"after {time.monotonic() - start:.1f} s: DistributedError: {e}")
            raise SystemExit(3)
""")


@pytest.mark.slow
def test_a_process_that_never_calls_the_step_is_an_error_in_bounded_time(tmp_path):
    (tmp_path / "never.py").write_text(NEVER_CALLS)
    done = titanax_launch(
        "--nproc", "2", "--devices-per-process", "1", str(tmp_path / "never.py"), timeout=120
    )
    assert done.returncode == 3, done.stdout[-3000:]
    found = re.search(r"\[0\] after ([\d.]+) s: DistributedError: (.*)", done.stdout)
    assert found, done.stdout[-3000:]
    assert 3 <= float(found.group(1)) < 10
    assert found.group(2).startswith(
        "step '<lambda>': process 1 (of 2) did not reach its first call with these arguments "
        "within 3 s"
    )


PROCESS_0_ALONE = textwrap.dedent("""
    import numpy as np
    import titanax as tx

    tx.distributed.initialize(heartbeat_s=10)
    import jax

    mesh = tx.mesh(devices=jax.devices()[:2], data=-1)  # process 0's 2 devices alone
    step = tx.data_parallel(lambda w, x: w - tx.pmean(x.mean(), "data"), mesh=mesh)
    print("result", float(step(np.float32(0), np.ones((2, 3), np.float32))))
""")


@pytest.mark.slow
def test_a_mesh_that_leaves_a_process_out_is_an_error(tmp_path):
    # `titanax launch --nproc 2 examples/mnist_dp/train.py` did this (8 devices per process,
    # a mesh over jax.devices()[:8]): unchecked, process 1 died in JAX with `RuntimeError:
    # generator raised StopIteration`, while process 0 ran on alone and printed a result.
    (tmp_path / "alone.py").write_text(PROCESS_0_ALONE)
    done = titanax_launch("--nproc", "2", "--devices-per-process", "2", str(tmp_path / "alone.py"))
    assert done.returncode == 1, done.stdout[-3000:]
    assert not re.search(r"^\[\d\] result", done.stdout, re.M), done.stdout[-3000:]
    assert "StopIteration" not in done.stdout
    for rank in (0, 1):  # each process raises it
        assert (
            f"[{rank}] titanax.errors.DistributedError: step '<lambda>' on mesh (data=2): the "
            "mesh holds none of the devices of process 1 (devices "
        ) in done.stdout
    assert "--devices-per-process K (here K = 1: 2 devices in all)" in done.stdout
