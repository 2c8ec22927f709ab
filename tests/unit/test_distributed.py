import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

import titanax as tx
from titanax.distributed import _describe as describe


def test_one_process_needs_nothing(monkeypatch):
    for var in ("TITANAX_COORDINATOR", "TITANAX_NUM_PROCESSES", "TITANAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert tx.distributed.initialize() is False
    assert tx.distributed.process_count() == 1 and tx.distributed.is_main_process()


def test_inconsistent_arguments(monkeypatch):
    with pytest.raises(tx.DistributedError, match="give num_processes and process_id too"):
        tx.distributed.initialize("127.0.0.1:1234")
    with pytest.raises(tx.DistributedError, match=r"process_id must be in 0 .. 1"):
        tx.distributed.initialize("127.0.0.1:1234", 2, 5)
    monkeypatch.setenv("TITANAX_NUM_PROCESSES", "two")
    with pytest.raises(tx.DistributedError, match="TITANAX_NUM_PROCESSES='two' is not an integer"):
        tx.distributed.initialize("127.0.0.1:1234")


def test_after_the_backend_started():
    # the test process has long started JAX: joining others is no longer possible
    with pytest.raises(tx.DistributedError, match="JAX has already started its backend"):
        tx.distributed.initialize("127.0.0.1:1234", 2, 0)


# ------------------------------------------------ the first call of a step on several processes


def fake_mesh(processes, per_process, size, axis="data"):
    """A mesh over the first ``size`` of ``processes * per_process`` fake devices."""
    devices = [
        SimpleNamespace(id=p * 1024 + i, process_index=p)
        for p in range(processes)
        for i in range(per_process)
    ]
    return SimpleNamespace(devices=np.array(devices[:size]), shape={axis: size}), devices


def test_a_mesh_that_leaves_a_process_out():
    mesh, devices = fake_mesh(2, 8, 8)  # `titanax launch --nproc 2` without --devices-per-process
    with pytest.raises(tx.DistributedError) as e:
        tx.distributed.check_mesh(mesh, what="step 'train_step'", devices=devices, processes=2)
    assert str(e.value) == (
        "step 'train_step' on mesh (data=8): the mesh holds none of the devices of process 1 "
        "(devices 1024-1031), but every process runs the step and passes its own rows of each "
        "batch. Mesh devices per process: process 0: 8; process 1: 0.\n"
        "Build the mesh over every process's devices: tx.mesh(data=-1, ...) or "
        "tx.mesh(devices=jax.devices(), ...); jax.devices() lists the 16 devices of all 2 "
        "processes, process 0's first, so a prefix such as jax.devices()[:8] leaves processes "
        "out. Under `titanax launch`, give each process its share with --devices-per-process K "
        "(here K = 4: 8 devices in all)."
    )
    mesh, devices = fake_mesh(4, 4, 12)  # unequal shares: 4, 4, 4, 0
    with pytest.raises(
        tx.DistributedError,
        match=r"process 3 \(devices 3072-3075\).*processes 0-2: 4; process 3: 0",
    ):
        tx.distributed.check_mesh(mesh, devices=devices, processes=4)
    mesh, devices = fake_mesh(2, 4, 6)
    with pytest.raises(
        tx.DistributedError, match="hold different numbers.*process 0: 4; process 1: 2"
    ):
        tx.distributed.check_mesh(mesh, devices=devices, processes=2)
    tx.distributed.check_mesh(fake_mesh(2, 4, 8)[0], devices=[], processes=2)  # equal: fine


class Store:
    """An in-memory stand-in for JAX's key-value store, shared by threads."""

    def __init__(self):
        self.data, self.cond = {}, threading.Condition()

    def set(self, key, value):
        with self.cond:
            assert key not in self.data, key  # JAX's store refuses to overwrite
            self.data[key] = value
            self.cond.notify_all()

    def get(self, key, timeout_s):
        with self.cond:
            self.cond.wait_for(lambda: key in self.data, timeout_s)
            return self.data.get(key)

    def delete(self, key):
        with self.cond:
            self.data.pop(key, None)


def agree_all(calls, timeout_s=10.0, key="k", store=None):
    """Runs ``agree`` for each process in a thread; each process's error message (or None)."""
    store = store or Store()
    errors = {}

    def one(p, args, batch):
        try:
            tx.distributed.agree(
                *describe(args, batch, ["argument 0 (state)", "argument 1 (batch)"]),
                store=store,
                key=key,
                process=p,
                processes=len(calls),
                timeout_s=timeout_s,
                what="step 'train_step'",
            )
            errors[p] = None
        except tx.DistributedError as e:
            errors[p] = str(e)

    threads = [
        threading.Thread(target=one, args=(p, *call)) for p, call in enumerate(calls) if call
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return errors


STATE = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


def test_processes_agree():
    batch = (np.ones((4, 3), np.float32), np.ones(4, np.int32))
    store = Store()
    assert agree_all([((STATE, batch), {1})] * 2, store=store) == {0: None, 1: None}
    assert set(store.data) == {"k/batch/0", "k/verdict"}  # the rest is deleted once read


def test_batches_of_different_shapes():
    rows = lambda n: (np.ones((n, 3), np.float32), np.ones(n, np.int32))  # noqa: E731
    errors = agree_all([((STATE, rows(4)), {1}), ((STATE, rows(2)), {1}), ((STATE, rows(4)), {1})])
    assert errors[0] == errors[1] == errors[2]  # every process raises the same error
    assert errors[0].startswith(
        "step 'train_step': the processes passed batches of different shapes to its first "
        "call with these arguments:\n"
        "  * argument 1 (batch) [0]: processes 0, 2: (4, 3) float32; process 1: (2, 3) float32\n"
        "  * argument 1 (batch) [1]: processes 0, 2: (4,) int32; process 1: (2,) int32\n"
        "Each process passes its own rows"
    )
    assert "drop_remainder" in errors[0]
    dtype = agree_all([((STATE, rows(4)), {1}), ((STATE, rows(4)[:1] + (np.ones(4),)), {1})])
    assert "argument 1 (batch) [1]: process 0: (4,) int32; process 1: (4,) float64" in dtype[1]


def test_other_arguments_must_be_the_same():
    batch = (np.ones((4, 3), np.float32),)
    wider = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(2, np.float32)}
    errors = agree_all(
        [((STATE, batch), {1}), ((wider, batch), {1}), ((dict(STATE, c=1.0), batch), {1})]
    )
    assert errors[0] == errors[1] == errors[2]
    assert "the processes passed different non-batch arguments" in errors[0]
    assert "  * argument 0 (state) [c]: processes 0, 1: absent; process 2: () float\n" in errors[0]
    assert (
        "  * argument 0 (state) [w]: processes 0, 2: (3, 2) float32; process 1: (3, 4) float32\n"
        in errors[0]
    )
    assert "batches of different shapes" not in errors[0]


def test_a_process_that_never_comes_is_an_error_in_bounded_time():
    batch = (np.ones((4, 3), np.float32),)
    start = time.monotonic()
    # 2 s, not less: process 2 waits that long for process 0's facts too, and a thread can
    # wait its turn for a while on a loaded machine (0.5 s made process 2 report process 0).
    errors = agree_all([((STATE, batch), {1}), None, ((STATE, batch), {1})], timeout_s=2)
    assert time.monotonic() - start < 5
    assert errors[0] == errors[2]
    assert errors[0].startswith(
        "step 'train_step': process 1 (of 3) did not reach its first call with these "
        "arguments within 2 s"
    )
    errors = agree_all([None, ((STATE, batch), {1})], timeout_s=0.5)  # process 0 never comes
    assert "process 0 (of 2) did not reach" in errors[1]


def test_each_call_has_its_own_keys():
    store = Store()
    ok, bad = ((STATE, (np.ones((4, 3)),)), {1}), ((STATE, (np.ones((2, 3)),)), {1})
    assert "different shapes" in agree_all([ok, bad], key="step/1", store=store)[0]
    assert agree_all([ok, ok], key="step/2", store=store) == {0: None, 1: None}  # no stale reads


@pytest.mark.parametrize("busy", [0, 1])
def test_process_0_on_a_port_in_use_is_a_clear_error(busy):
    # Before: the coordinator's port in use crashed JAX later (SIGSEGV, or clients that
    # timed out); the start-up check's port (the next one) in use was a raw OSError.
    import socket

    from titanax.distributed import _preflight
    from titanax.launch.runner import free_port

    port = free_port()
    with socket.create_server(("127.0.0.1", port + busy)):
        start = time.monotonic()
        with pytest.raises(tx.DistributedError) as e:
            _preflight(f"127.0.0.1:{port}", 2, 0, timeout_s=1)
    assert time.monotonic() - start < 3
    message = str(e.value)
    assert message.startswith(
        f"tx.distributed.initialize (coordinator='127.0.0.1:{port}', num_processes=2, "
        "process_id=0): process 0 cannot listen on "
    )
    if busy:
        assert (
            f"port {port + 1} for Titanax's start-up check ([Errno 98] Address already" in message
        )
    else:
        assert f"the coordinator port {port} ([Errno 98] Address already in use)" in message
