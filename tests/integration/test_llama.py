"""The Llama example: every config in examples/llama/configs/ trains as the single-device
model does (per-update losses to 1e-4; the bfloat16 config within a stated tolerance),
accumulation equals the big batch, a resumed run equals an uninterrupted one, and the
command line works (``--help``, ``--quick``)."""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import titanax as tx
from examples.llama import model as llama
from examples.llama import train as example
from examples.llama.steps import make_mesh, parse_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "examples", "llama", "configs", "*.yaml")))
DP = os.path.join(ROOT, "examples", "llama", "configs", "dp.yaml")

# CI-sized: a tiny model (4 layers: one per stage of the 4-stage pipeline), 3 updates.
TINY = [
    "model.hidden_size=16",
    "model.intermediate_size=32",
    "model.num_hidden_layers=4",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "steps=3",
    "batch_size=16",
    "seq_len=16",
    "lr=1e-2",
    "warmup=0",
    "eval_every=0",
    "eval_batches=0",  # no evaluation: one compiled program less per config
    "microbatches=2",
]
BF16_TOLERANCE = 2e-2  # |loss difference| of bfloat16 compute vs float32, losses near 5.5


def settings(path: str, *more: str) -> example.Config:
    argv = ["--config", path]
    for item in (*TINY, *more):
        argv += ["--set", item]
    return example.configure(argv)


def run(args: example.Config) -> list[float]:
    mesh = make_mesh(parse_mesh(args.mesh), jax.devices())
    return example.train(args, mesh)[1]


@functools.cache
def reference(accumulate: int = 1) -> list[float]:
    """The same model, data and optimizer, float32 on one device: plain ``jax.jit``."""
    args = dataclasses.replace(settings(DP), accumulate=1)
    cfg = args.model
    train_data, _ = example.load_data(args, cfg)

    @jax.jit
    def step(state: tx.TrainState, tokens: jax.Array) -> tuple[tx.TrainState, jax.Array]:
        loss, grads = jax.value_and_grad(llama.loss_fn)(state.params, tokens, cfg)
        return state.apply_gradients(grads), loss

    # the parameters as `example.train` makes them: the same jitted init (compiled once, not
    # one random.normal program per leaf shape), and so the same initial values
    params = jax.jit(llama.init, static_argnums=1)(jax.random.key(args.seed), cfg)
    state = tx.TrainState.create(params, example.make_optimizer(args))
    losses = []
    for j in range(args.steps):
        rng = np.random.default_rng((args.seed, j))
        state, loss = step(
            state, example.windows(train_data, args.batch_size, args.seq_len + 1, rng)
        )
        losses.append(float(loss))
    assert losses[-1] < losses[0]  # the updates change the model: later losses test them
    return losses


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p)[:-5])
def test_config_trains_as_the_single_device_model(path):
    args = settings(path)
    losses = run(args)
    ref = reference()
    diff = float(np.max(np.abs(np.subtract(losses, ref))))
    print(
        f"{os.path.basename(path)} mesh {args.mesh} {args.dtype}: max |loss - 1 device| {diff:.2e}"
    )
    if args.dtype == "bfloat16":
        assert 0 < diff < BF16_TOLERANCE  # bfloat16 really ran, and stayed close
    else:
        assert diff < 1e-4


def test_every_composition_the_brief_names_has_a_config():
    meshes = {os.path.basename(p)[:-5]: settings(p).mesh for p in CONFIGS}
    for name, mesh in {
        "dp": "data=8",
        "fsdp": "fsdp=8",
        "tp": "data=2,model=4",
        "fsdp_tp": "fsdp=4,model=2",
        "pp": "data=2,stage=4",
        "hsdp": "data=2,fsdp=4",
        "dp_pp_tp": "data=2,stage=2,model=2",
    }.items():
        assert parse_mesh(meshes[name]) == parse_mesh(mesh), name


def test_accumulating_two_calls_equals_one_batch_of_twice_the_size():
    losses = run(settings(DP, "accumulate=2"))  # 2 calls of 8 rows per update
    np.testing.assert_allclose(losses, reference(), atol=1e-4)  # 1 call of 16 rows


def test_resumed_run_gives_the_losses_of_an_uninterrupted_one(tmp_path):
    args = settings(DP, f"checkpoint_dir={tmp_path}", "save_every=1")
    full = run(args)
    mngr = tx.checkpoint.Manager(str(tmp_path))
    assert mngr.all_steps() == [1, 2, 3]
    for step in (2, 3):  # as if the run had stopped after its first update
        mngr.delete(step)
    mngr.close()
    resumed = run(args)
    assert len(resumed) == 2
    np.testing.assert_allclose(resumed, full[1:], atol=1e-5)


def test_exported_hugging_face_weights_load_back_as_the_trained_model(tmp_path):
    mesh = make_mesh(parse_mesh("data=8"), jax.devices())
    trained, _, _ = example.train(settings(DP, f"export_hf={tmp_path}"), mesh)
    args = settings(DP, f"hf_checkpoint={tmp_path}")
    assert example.hf_config(args) == args.model  # config.json gives back the same sizes
    train_data, _ = example.load_data(args, args.model)
    tokens = example.windows(train_data, 16, 17, np.random.default_rng((args.seed, 0)))
    expected = float(llama.loss_fn(jax.device_get(trained.params), tokens, args.model))
    assert abs(expected - reference()[0]) > 1e-2  # the trained weights, not the initial ones
    losses = example.train(args, mesh)[1]  # starts from the exported weights
    assert losses[0] == pytest.approx(expected, abs=1e-5)


def test_help_lists_the_settings():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "llama", "train.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    for key in ("--mesh", "--model.hidden-size", "--accumulate", "--hf-checkpoint", "--quick"):
        assert key in out.stdout


def test_quick_run_learns_and_logs_throughput(tmp_path):
    path = tmp_path / "metrics.jsonl"
    val = example.main(["--quick", "--metrics", str(path)])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["tokens_per_s"] > 0 for r in train[1:])  # the first only starts the clock
    assert "mfu" not in train[-1]  # CPU: no known peak, so no made-up MFU
    assert rows[-1]["eval_loss"] == pytest.approx(val) and math.isfinite(val)
