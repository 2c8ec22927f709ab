import pytest

import titanax as tx


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
