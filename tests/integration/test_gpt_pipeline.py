"""The promise: the pipelined GPT trains like the unpipelined one (loss curves to 1e-4)."""

import jax
import numpy as np
import pytest

import titanax as tx
from examples.gpt_pipeline import train as pipelined
from examples.gpt_small_tp import model as gpt
from examples.gpt_small_tp import train as unpipelined

CFG = gpt.GPTConfig(seq_len=32, d_model=64, heads=4, layers=4)


@pytest.fixture(scope="module")
def reference():
    one = tx.mesh(devices=jax.devices()[:1], data=1, model=1)
    return unpipelined.train(CFG, one, steps=8, batch_size=8, eval_batches=2)


@pytest.mark.parametrize(
    "schedule, virtual",
    [("1f1b", 1), ("gpipe", 1), ("zero_bubble", 1), ("interleaved_1f1b", 2)],
)
def test_loss_curve_matches_the_unpipelined_model(reference, schedule, virtual):
    stages = 4 // virtual
    mesh = tx.mesh(devices=jax.devices()[: 2 * stages], data=2, stage=stages)
    _, losses, val = pipelined.train(
        CFG,
        mesh,
        steps=8,
        schedule=schedule,
        microbatches=4,
        virtual_stages=virtual,
        batch_size=8,
        eval_batches=2,
    )
    _, ref_losses, ref_val = reference
    diff = float(np.max(np.abs(np.subtract(losses, ref_losses))))
    print(
        f"{schedule}: max |loss - unpipelined| over 8 steps {diff:.2e}; "
        f"validation {val:.6f} vs {ref_val:.6f}"
    )
    assert diff < 1e-4 and abs(val - ref_val) < 1e-4
    assert losses[-1] < losses[0] - 0.5


def test_zero3_pipeline_matches_the_unpipelined_model(reference):
    mesh = tx.mesh(data=2, stage=4)
    state, losses, val = pipelined.train(
        CFG, mesh, steps=8, schedule="1f1b", microbatches=4, batch_size=8, eval_batches=2, zero=3
    )
    _, ref_losses, ref_val = reference
    diff = float(np.max(np.abs(np.subtract(losses, ref_losses))))
    print(f"ZeRO-3 x 1f1b: max |loss - unpipelined| over 8 steps {diff:.2e}")
    assert diff < 1e-4 and abs(val - ref_val) < 1e-4
    kernel = state.params["h"]["mlp"]["up"]["kernel"]  # (4 stages, 64, 256)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("stage", None, "data")
    assert kernel.addressable_shards[0].data.shape == (1, 64, 128)


def test_stage_parameters_live_on_their_stage():
    mesh = tx.mesh(data=2, stage=4)
    step, _ = pipelined.make_steps(CFG, mesh, schedule="1f1b", microbatches=4)
    # the optimizer of the 8-step runs above: the same program, loaded from the compilation
    # cache (the layout does not depend on the optimizer)
    optimizer = unpipelined.make_optimizer(1e-3, 8)
    state = tx.TrainState.create(gpt.init(jax.random.key(0), CFG), optimizer)
    tokens = np.zeros((8, CFG.seq_len + 1), np.int32)
    state, _ = step(state, tokens)
    kernel = state.params["h"]["mlp"]["up"]["kernel"]  # the model's stacked blocks, as they are
    assert kernel.shape == (4, 64, 256) and kernel.sharding.spec == jax.sharding.PartitionSpec(
        "stage"
    )
    assert kernel.addressable_shards[0].data.shape == (1, 64, 256)


def test_example_main_runs(capsys):
    # 8 steps: the programs of test_loss_curve_matches_the_unpipelined_model[zero_bubble-1],
    # which the run then loads from the compilation cache
    val = pipelined.main(
        [
            "--steps",
            "8",
            "--d-model",
            "64",
            "--seq-len",
            "32",
            "--batch-size",
            "8",
            "--schedule",
            "zero_bubble",
        ]
    )
    assert "perplexity" in capsys.readouterr().out and np.isfinite(val)
