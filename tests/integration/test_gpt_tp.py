"""The promise: GPT-small under TP and DP x TP has the single-device model's perplexity."""

import jax
import numpy as np
import pytest

import titanax as tx
from examples.gpt_small_tp import model as gpt
from examples.gpt_small_tp import train as example
from tests.integration.examples_run import SMALL_GPT

CFG = gpt.GPTConfig(seq_len=32, d_model=64, heads=4, layers=2)


def meshes():
    d = jax.devices()
    return {
        "1 device": tx.mesh(devices=d[:1], data=1, model=1),
        "model=4": tx.mesh(devices=d[:4], data=1, model=4),
        "data=2 x model=4": tx.mesh(data=2, model=4),
    }


def test_validation_loss_after_training_agrees_to_1e4():
    results = {
        name: example.train(CFG, mesh, steps=12, batch_size=8, eval_batches=2)
        for name, mesh in meshes().items()
    }
    ref_losses, ref_val = results["1 device"][1], results["1 device"][2]
    for name, (_, losses, val) in results.items():
        print(
            f"{name}: validation loss {val:.6f} (|diff| {abs(val - ref_val):.2e}), "
            f"max train-loss diff {np.max(np.abs(np.subtract(losses, ref_losses))):.2e}"
        )
        assert abs(val - ref_val) < 1e-4
        np.testing.assert_allclose(losses, ref_losses, atol=1e-4)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # it learned


@pytest.mark.parametrize("name", ["model=4", "data=2 x model=4"])
def test_one_step_gradients_match_to_1e5_relative(name):
    mesh = meshes()[name]
    params = gpt.init(jax.random.key(0), CFG)
    tokens = gpt.windows(gpt.corpus(), 8, CFG.seq_len + 1, np.random.default_rng(0))
    ref = jax.jit(jax.grad(gpt.loss_fn), static_argnums=2)(params, tokens, CFG)

    def grads(p, t):
        return tx.pmean(jax.grad(gpt.loss_fn)(p, t, CFG), "data")

    f = tx.data_parallel(tx.tensor_parallel(example.gpt_rules())(grads), mesh=mesh, donate=False)
    got = f(params, tokens)
    # Relative to each leaf's norm; a leaf whose exact gradient is (nearly) zero is measured
    # against 1e-3 of the total norm instead (k's bias: softmax ignores a shift shared by keys).
    floor = 1e-3 * float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(ref))))
    worst = max(
        float(np.linalg.norm(a - b) / max(np.linalg.norm(b), floor))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))
    )
    print(f"{name}: worst per-leaf relative gradient error {worst:.2e}")
    assert worst < 1e-5


def test_heads_and_mlp_are_split_over_model():
    mesh = meshes()["data=2 x model=4"]
    train, _ = example.make_steps(CFG, mesh)
    import optax

    state = tx.TrainState.create(gpt.init(jax.random.key(0), CFG), optax.adam(1e-3))
    tokens = np.zeros((8, CFG.seq_len + 1), np.int32)
    in_specs, _ = train.specs(state, tokens)
    blk = in_specs[0].params["h"]  # the stacked blocks: the layer dimension stays whole
    assert blk["attn"]["qkv"]["kernel"] == jax.sharding.PartitionSpec(None, None, None, "model")
    assert blk["attn"]["proj"]["kernel"] == jax.sharding.PartitionSpec(None, "model")
    assert blk["mlp"]["up"]["kernel"] == jax.sharding.PartitionSpec(None, None, "model")
    assert blk["mlp"]["down"]["kernel"] == jax.sharding.PartitionSpec(None, "model")
    assert in_specs[0].params["wte"] == jax.sharding.PartitionSpec()
    assert in_specs[1] == jax.sharding.PartitionSpec("data")


def test_example_main_runs(capsys):
    # 4 steps: the programs of the 1-process run in test_multihost.py, which then loads them
    # from the compilation cache
    val = example.main(["--steps", "4", *SMALL_GPT])
    assert "perplexity" in capsys.readouterr().out and np.isfinite(val)
