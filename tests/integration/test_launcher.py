"""`titanax launch` as an operator meets it: signals, processes that end early or stall, and
what reaches the screen. Processes on loopback; each test bounded in time."""

import io
import re
import signal
import subprocess
import sys
import textwrap
import time

from tests.integration.examples_run import ENV, ROOT
from titanax.launch.runner import launch


def launcher(*args, script, tmp_path):
    """``titanax launch ARGS SCRIPT`` started in the background; the Popen."""
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(script))
    cmd = [sys.executable, "-m", "titanax.launch.cli", "launch", *args, str(path)]
    return subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )


def alive(pid):
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


QUIET = """
    import os, time
    print("ready", os.getpid(), flush=True)
    time.sleep(1000)
"""


def test_every_signal_that_ends_the_launcher_ends_the_job(tmp_path):
    # Before: SIGTERM, SIGHUP (and SIGKILL) left both processes running, in their own
    # sessions; only SIGINT (KeyboardInterrupt) stopped them. The other signals the launcher
    # records (SIGQUIT, SIGUSR1...) take SIGTERM's path: tests/unit/test_launcher.py.
    sigs = [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL]
    jobs = {}
    for sig in sigs:  # all at once: one launcher per signal
        (tmp_path / sig.name).mkdir()
        jobs[sig] = launcher("--nproc", "2", script=QUIET, tmp_path=tmp_path / sig.name)
    pids = {}
    for sig, proc in jobs.items():
        pids[sig] = []
        for line in proc.stdout:
            if m := re.match(r"\[\d\] ready (\d+)", line):
                pids[sig].append(int(m.group(1)))
            if len(pids[sig]) == 2:
                break
        proc.send_signal(sig)
    for sig, proc in jobs.items():
        rest = proc.communicate(timeout=30)[0]
        if sig != signal.SIGKILL:  # the launcher stops the processes and says why
            assert proc.returncode == 128 + sig, rest
            assert f"DistributedError: titanax launch received {sig.name}" in rest
    deadline = time.monotonic() + 5  # SIGKILL: the kernel ends them (PR_SET_PDEATHSIG)
    while time.monotonic() < deadline and any(alive(p) for ps in pids.values() for p in ps):
        time.sleep(0.1)
    left = {sig.name: [p for p in ps if alive(p)] for sig, ps in pids.items()}
    assert not any(left.values()), left


STEP = """
    import time
    import numpy as np
    import titanax as tx

    tx.distributed.initialize(heartbeat_s=10)
    import jax

    step = tx.data_parallel(
        lambda w, x: w - tx.pmean(x.mean(), "data"), mesh=tx.mesh(data=-1), donate=False
    )
    rank = jax.process_index()
    w = np.float32(0)
"""


def run_job(tmp_path, script, *args):
    """Runs the job to its end: ``(exit code, output, seconds from the marked moment to the
    end of the launcher)``; the script prints ``mark <time.time()>`` at that moment."""
    proc = launcher(
        "--nproc", "2", "--devices-per-process", "1", "--grace", "1", *args,
        script=textwrap.dedent(STEP) + textwrap.dedent(script), tmp_path=tmp_path,
    )  # fmt: skip
    try:
        out = proc.communicate(timeout=110)[0]
    finally:
        proc.kill()
    ended = time.time()
    mark = re.search(r"mark ([\d.]+)", out)
    assert mark, out[-3000:]
    return proc.returncode, out, ended - float(mark.group(1))


def test_a_process_that_finishes_early_stops_the_job_in_bounded_time(tmp_path):
    # Before: process 0 waited in a collective for 5 minutes, until JAX's shutdown barrier
    # failed, and the launcher blamed process 1 ("killed by SIGABRT"), which had finished.
    code, out, after = run_job(
        tmp_path,
        """
        for i in range(2 if rank == 1 else 1000):  # process 1 has 2 batches, process 0 more
            w = float(step(w, np.ones((2, 3), np.float32)))
        if rank == 1:
            print("mark", time.time(), flush=True)
        """,
        "--exit-timeout",
        "3",
    )
    assert code == 1, out[-3000:]
    found = re.search(r"\[launch\] DistributedError: (.*)", out)
    assert found, out[-3000:]
    assert re.match(
        r"process 1 finished its script at [\d.]+ s; still running 3 s later: process 0 "
        r"\(pid \d+, 2 steps, the last [\d.]+ s ago, inside step 3\); process 1 \(its script "
        r"ended, but it did not exit\)\. Every collective needs every process",
        found.group(1),
    ), found.group(1)
    assert "raise --exit-timeout (now 3 s)" in found.group(1)
    assert "SIGABRT" not in out
    assert after < 3 + 1 + 10  # --exit-timeout, --grace, and reading what is left


def test_a_stuck_process_stops_the_job_and_is_named(tmp_path):
    # Before: process 0 waited in a collective for as long as anyone waited (the heartbeat
    # only notices processes that died).
    code, out, after = run_job(
        tmp_path,
        """
        for i in range(1000):
            if rank == 1 and i == 2:
                print("mark", time.time(), flush=True)
                time.sleep(1000)  # a dead data pipeline
            w = float(step(w, np.ones((2, 3), np.float32)))
        """,
        "--hang-timeout",
        "5",
    )
    assert code == 1, out[-3000:]
    found = re.search(r"\[launch\] DistributedError: (.*)", out)
    assert found, out[-3000:]
    assert re.match(
        r"no step completed for 5 s \(--hang-timeout\): stuck: process 1 \(pid \d+, 2 steps, "
        r"the last [\d.]+ s ago, in its own code\); waiting for it: process 0 \(pid \d+, 2 "
        r"steps, the last [\d.]+ s ago, inside step 3\)\. The Python stacks of process 1 "
        r"follow \(SIGUSR1\)",
        found.group(1),
    ), found.group(1)
    # faulthandler's dump: where process 1 was
    line = (tmp_path / "job.py").read_text().splitlines().index(
        "        time.sleep(1000)  # a dead data pipeline"
    ) + 1
    assert re.search(rf'\[1\]   File ".*job\.py", line {line} in <module>', out), out[-3000:]
    assert after < 5 + 1 + 1 + 10  # --hang-timeout, the stacks, --grace, what is left


BLOCKS = """
    import os, sys, time
    rank = int(os.environ["TITANAX_PROCESS_ID"])
    start = float(sys.argv[1])
    while time.time() < start:  # both processes write at once
        pass
    for i in range(3000):  # one write of 4 lines each time, as print() of a message does
        sys.stdout.write("".join(f"line {k} of block {i} of {rank}\\n" for k in range(4)))
"""


def test_lines_a_process_writes_at_once_stay_together(tmp_path):
    # Before: one reading thread per process wrote line by line, so another process's line
    # could land inside a multi-line message (11 of 4,000 blocks split in one run): the
    # cause of test_processes_that_pass_batches_of_different_shapes failing under load.
    (tmp_path / "blocks.py").write_text(textwrap.dedent(BLOCKS))
    out = io.StringIO()  # the launcher runs here: no second import of titanax
    code = launch(str(tmp_path / "blocks.py"), [str(time.time() + 2)], nproc=2, out=out)
    assert code == 0, out.getvalue()[-3000:]
    lines = out.getvalue().splitlines()
    split = [
        (a, b)
        for a, b in zip(lines, lines[1:])
        if (m := re.match(r"\[(\d)\] line ([012]) of block (\d+)", a))
        and b != f"[{m[1]}] line {int(m[2]) + 1} of block {m[3]} of {m[1]}"
    ]
    assert len([x for x in lines if " line 0 " in x]) == 6000
    assert not split, split[:5]
