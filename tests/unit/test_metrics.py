"""tx.metrics: sinks write readable files, the logger skips and converts as promised, FLOPs and MFU."""

import glob
import json
import os
import struct
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import titanax as tx
from titanax import metrics


class Recorder:
    """A sink that keeps what it is given."""

    def __init__(self):
        self.writes, self.closed = [], False

    def write(self, step, values):
        self.writes.append((step, dict(values)))

    def close(self):
        self.closed = True


class Probe:
    """A metric value that counts its conversions to float."""

    def __init__(self, value):
        self.value, self.conversions = value, 0

    def __float__(self):
        self.conversions += 1
        return float(self.value)


class Untouchable:
    """A metric value that fails the test if anything converts or fetches it."""

    def __float__(self):
        raise AssertionError("converted a metric on a step that is not logged")

    def __array__(self, *args, **kwargs):
        raise AssertionError("fetched a metric on a step that is not logged")

    def copy_to_host_async(self):
        raise AssertionError("fetched a metric on a step that is not logged")


# --------------------------------------------------------------------------- sinks


def test_stdout_writes_one_line_per_write(capsys):
    sink = metrics.Stdout()
    sink.write(3, {"loss": 0.123456, "accuracy": 1.0})
    sink.write(4, {})
    assert capsys.readouterr().out == "step 3: loss=0.1235 accuracy=1\nstep 4:\n"


def test_jsonl_writes_flushed_json_lines_and_appends(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    sink = metrics.JSONL(path)
    assert not path.exists()  # nothing is opened before the first write
    sink.write(1, {"loss": 0.5, "lr": 1e-3})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 0.5, "lr": 1e-3}
    ]  # readable before close: flushed
    sink.close()
    again = metrics.JSONL(path)  # a resumed run continues the file
    again.write(2, {"loss": 0.25})
    again.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    fresh = metrics.JSONL(path, mode="w")
    fresh.write(3, {"loss": 0.125})
    fresh.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 3, "loss": 0.125}
    ]
    with pytest.raises(tx.TitanaxError, match="mode must be one of 'a', 'w'"):
        metrics.JSONL(path, mode="x")


def _tfrecords(path):
    """The records of a TFRecord file: u64 length, u32 crc, data, u32 crc."""
    data, pos, out = open(path, "rb").read(), 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        out.append(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
    return out


def _scalars(logdir):
    from tensorboardX.proto import event_pb2

    found = []
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for record in _tfrecords(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                found.append((event.step, value.tag, value.simple_value))
    return sorted(found)


def test_tensorboard_writes_readable_event_files(tmp_path):
    logdir = str(tmp_path / "tb")
    sink = metrics.TensorBoard(logdir)
    assert not os.path.exists(logdir)  # the writer starts at the first write
    sink.write(0, {"loss": 1.0, "train/accuracy": 0.5})
    sink.write(10, {"loss": 0.25, "train/accuracy": 0.75})
    sink.close()
    assert _scalars(logdir) == [
        (0, "loss", 1.0),
        (0, "train/accuracy", 0.5),
        (10, "loss", 0.25),
        (10, "train/accuracy", 0.75),
    ]


@pytest.mark.parametrize(
    "make, module, extra",
    [
        (lambda: metrics.TensorBoard("unused"), "tensorboardX", "tensorboard"),
        (lambda: metrics.WandB("unused", mode="offline"), "wandb", "wandb"),
    ],
)
def test_a_missing_optional_package_names_the_extra(monkeypatch, make, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now fails
    with pytest.raises(ImportError, match=rf"pip install titanax\[{extra}\]") as e:
        make()
    assert module in str(e.value)


def _wandb_history(run_dir):
    """(step, {key: value}) of each history record of an offline run's .wandb file.

    The file is a LevelDB-style log (32 KiB blocks; each chunk has a 7-byte
    header: crc, length, type) of ``wandb_internal_pb2.Record`` messages, after
    a 7-byte W&B header.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data, pos, block, pending, history = open(path, "rb").read(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record
        if kind in (1, 4):  # FULL/LAST end it
            record = pb.Record.FromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in record.history.item
                }
                history.append((record.history.step.num, items))
    return history


def test_wandb_offline_run_writes_its_local_files(tmp_path, monkeypatch):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")  # and mode= below: never the network
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sink = metrics.WandB("titanax-test", mode="offline", dir=str(tmp_path), config={"lr": 0.1})
    with metrics.Logger(sink, every=2) as log:
        for step in range(5):
            log.log(step, {"loss": 1.0 / (step + 1), "train": {"accuracy": step / 4}})
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    # wandb 0.31's run.finish() can return before wandb-core has written the
    # .wandb file (measured: 2 of 6 offline runs still empty right after it).
    deadline = time.monotonic() + 30
    while len(history := _wandb_history(run_dir)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [step for step, _ in history] == [0, 2, 4]
    assert [(h["loss"], h["train/accuracy"]) for _, h in history] == [
        (1.0, 0.0),
        (pytest.approx(1 / 3), 0.5),
        (0.2, 1.0),
    ]
    assert os.path.isdir(os.path.join(run_dir, "files"))


# --------------------------------------------------------------------------- logger


def test_logger_writes_only_on_process_0(monkeypatch):
    sink = Recorder()
    log = metrics.Logger(sink)
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
    log.log(0, {"loss": Untouchable()})  # not fetched, not converted
    log.log(1, {"loss": Untouchable()}, force=True)
    assert sink.writes == []
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 0)
    log.log(2, {"loss": jnp.float32(0.5)})
    assert sink.writes == [(2, {"loss": 0.5})]


def test_every_skips_steps_without_converting_their_values():
    sink = Recorder()
    probes = [Probe(float(step)) for step in range(7)]
    gone = jnp.ones(())
    gone.delete()  # any attempt to read it raises
    with metrics.Logger(sink, every=3) as log:
        for step, probe in enumerate(probes):
            values = {"probe": probe}
            if not log.due(step):  # values that fail if anything reads them
                values |= {"untouchable": Untouchable(), "deleted": gone}
            log.log(step, values)
        log.log(7, {"probe": Probe(7.0)}, force=True)  # e.g. the last step
    assert [conv.conversions for conv in probes] == [1, 0, 0, 1, 0, 0, 1]
    assert [step for step, _ in sink.writes] == [0, 3, 6, 7]
    assert sink.writes[1] == (3, {"probe": 3.0})
    assert sink.closed


def test_logger_converts_arrays_and_flattens_nested_metrics():
    sink = Recorder()
    x = jax.device_put(jnp.arange(8.0), jax.devices()[1])
    metrics.Logger(sink).log(
        5,
        {
            "loss": jnp.mean(x),
            "train": {"count": np.int32(8), "ok": True, "lr": np.array([1e-3])},
            "host": 2,
        },
    )
    ((step, values),) = sink.writes
    assert step == 5
    assert values == {
        "loss": 3.5,
        "train/count": 8.0,
        "train/ok": 1.0,
        "train/lr": 1e-3,
        "host": 2.0,
    }
    assert all(type(v) is float for v in values.values())


def test_logger_rejects_what_it_cannot_log():
    with pytest.raises(TypeError, match=r"write\(step, metrics\) and close\(\):\n  \* sink 1: str"):
        metrics.Logger(Recorder(), "stdout")
    for every in (0, -2, 1.5, True):
        with pytest.raises(tx.TitanaxError, match="every must be an int >= 1"):
            metrics.Logger(Recorder(), every=every)
    with pytest.raises(
        tx.TitanaxError, match=r"must be scalars, but:\n  \* logits: ndarray of shape \(2, 3\)"
    ):
        metrics.Logger(Recorder()).log(0, {"loss": 1.0, "logits": jnp.zeros((2, 3))})


def test_logger_closes_its_sinks_on_error():
    sinks = Recorder(), Recorder()
    with pytest.raises(RuntimeError), metrics.Logger(*sinks):
        raise RuntimeError("the step failed")
    assert all(s.closed for s in sinks)

    class Broken(Recorder):
        def close(self):
            raise OSError("disk full")

    last = Recorder()
    with pytest.raises(OSError, match="disk full"):
        metrics.Logger(Broken(), last).close()
    assert last.closed  # the others are still closed


def test_logger_adds_throughput_at_logged_steps():
    ticks = iter([10.0, 12.0, 13.0])
    tp = metrics.Throughput(examples_per_step=64, clock=lambda: next(ticks))
    sink = Recorder()
    log = metrics.Logger(sink, every=4, throughput=tp)
    for step in range(9):
        log.log(step, {"loss": 1.0})
    assert sink.writes == [
        (0, {"loss": 1.0}),  # starts the clock: compilation is not counted
        (4, {"loss": 1.0, "step_time_s": 0.5, "examples_per_s": 128.0}),
        (8, {"loss": 1.0, "step_time_s": 0.25, "examples_per_s": 256.0}),
    ]


# --------------------------------------------------------------------------- FLOPs, MFU


def test_step_flops_of_a_jitted_matmul_is_2mnk():
    m, k, n = 64, 32, 16
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    expected = 2 * m * k * n
    jitted = jax.jit(lambda a, b: a @ b)
    lowered = jitted.lower(a, b)
    assert metrics.step_flops(jitted, a, b) == expected
    assert metrics.step_flops(lowered) == expected
    assert metrics.step_flops(lowered.compile()) == expected
    assert metrics.step_flops(lambda a, b: a @ b, a, b) == expected  # jitted for us
    shapes = jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32)
    assert metrics.step_flops(jitted, *shapes) == expected
    # Two chained matmuls: 2*m*k*n + 2*m*n*n.
    two = jax.jit(lambda a, b, c: (a @ b) @ c)
    assert metrics.step_flops(two, a, b, jnp.ones((n, n))) == expected + 2 * m * n * n


def test_step_flops_of_a_parallel_function_is_per_device():
    m, k, n, replicas = 64, 32, 16, 8
    mesh = tx.mesh(data=replicas)

    @tx.data_parallel(axis="data", mesh=mesh)
    def step(w, x):
        return w * 0.5, tx.pmean(jnp.sum(x @ w), "data")

    w, x = jnp.ones((k, n)), jnp.ones((m, k))
    flops = metrics.step_flops(step, w, x)
    per_device = 2 * (m // replicas) * k * n  # each replica multiplies its 8 rows
    # plus the sum of the (8, 16) product, the halving of w and pmean's division
    assert per_device <= flops <= per_device + (m // replicas) * n + k * n + 8
    new_w, loss = step(w, x)  # lowering ran nothing: the arguments are still there
    assert float(loss) == (m // replicas) * k * n and float(new_w[0, 0]) == 0.5


def test_flops_of_reads_old_and_new_cost_analysis_results():
    assert metrics.flops_of({"flops": 12.0, "bytes accessed": 3.0}) == 12.0
    assert metrics.flops_of([{"flops": 5.0}]) == 5.0  # older JAX: a list of dicts
    assert metrics.flops_of([{}, {"flops": 7}]) == 7.0
    for missing in ({}, [], None, [{}], {"flops": -1.0}, {"flops": float("nan")}, {"flops": "?"}):
        assert metrics.flops_of(missing) is None


def test_mfu_is_none_on_cpu():
    assert jax.devices()[0].platform == "cpu"
    assert metrics.peak_flops() is None
    assert metrics.mfu(1e9, 0.1) is None
    assert metrics.mfu(None, 0.1, peak_flops_per_s=1e12) is None
    assert metrics.mfu(1e9, 0.1, peak_flops_per_s=1e12) == pytest.approx(0.01)
    ticks = iter([0.0, 1.0])
    tp = metrics.Throughput(flops_per_step=1e9, clock=lambda: next(ticks))
    assert tp.peak_flops_per_s is None
    tp.measure(0)
    assert tp.measure(4) == {"step_time_s": 0.25, "flops_per_s": 4e9}  # no "mfu"


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v5 lite", 197e12),
        ("cpu", None),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_peak_flops_looks_up_the_device_kind(kind, peak):
    assert metrics.peak_flops(types.SimpleNamespace(device_kind=kind)) == peak


def test_throughput_rates_between_measurements():
    ticks = iter([100.0, 104.0, 105.0, 106.0, 107.0])
    tp = metrics.Throughput(
        flops_per_step=2e12,
        examples_per_step=32,
        tokens_per_step=32 * 128,
        peak_flops_per_s=1e13,
        clock=lambda: next(ticks),
    )
    assert tp.measure(0) == {}
    rates = tp.measure(8)  # 8 steps in 4 s
    assert rates == {
        "step_time_s": 0.5,
        "examples_per_s": 64.0,
        "tokens_per_s": 8192.0,
        "flops_per_s": 4e12,
        "mfu": pytest.approx(0.4),
    }
    assert tp.measure(8) == {}  # no step since: nothing to report
    tp.start(100)  # e.g. after an evaluation
    assert tp.measure(102)["step_time_s"] == 0.5
