"""Exact resume: train to 2N saving at N; restore N in a new process, train to 2N: the
parameters are bit-identical (state, data position and optimizer step all restored)."""

import shutil

import jax
import numpy as np
import optax
import pytest

import titanax as tx
from examples.gpt_small_tp import model as gpt
from examples.gpt_small_tp import train as gpt_example
from examples.mnist_dp import train as mnist
from tests.integration.examples_run import SMALL_GPT, run


def resumed_equals_straight(tmp_path, script, args, n, like):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(
        script,
        *args,
        "--steps",
        str(2 * n),
        "--save-every",
        str(n),
        "--checkpoint-dir",
        str(straight),
    )
    shutil.copytree(straight / str(n), resumed / str(n))  # only the checkpoint at N
    out = run(script, *args, "--steps", str(2 * n), "--checkpoint-dir", str(resumed))
    assert f"resuming from step {n}" in out
    a = tx.checkpoint.Manager(straight).restore(2 * n, like=like)
    b = tx.checkpoint.Manager(resumed).restore(2 * n, like=like)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-identical
    assert int(b.step) == 2 * n


def on_one_device(tree):
    return jax.device_put(tree, jax.devices()[0])


@pytest.mark.slow
def test_exact_resume_data_parallel(tmp_path):
    params = mnist.init_params(jax.random.key(0), (64, 128, 128, 10))
    like = on_one_device(tx.TrainState.create(params, optax.adam(1e-3)))
    resumed_equals_straight(tmp_path, "examples/mnist_dp/train.py", ["--devices", "8"], 10, like)


@pytest.mark.slow
def test_exact_resume_data_x_tensor_parallel(tmp_path):
    cfg = gpt.GPTConfig(seq_len=32, d_model=64, heads=4, layers=1)
    optimizer = gpt_example.make_optimizer(1e-3, 6)
    like = on_one_device(tx.TrainState.create(gpt.init(jax.random.key(0), cfg), optimizer))
    args = ["--mesh", "data=2,model=4", *SMALL_GPT]
    resumed_equals_straight(tmp_path, "examples/gpt_small_tp/train.py", args, 3, like)
