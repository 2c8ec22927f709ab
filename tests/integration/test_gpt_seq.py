"""The GPT example with its sequences split over devices (``--seq N``: tx.context_parallel):
a context length whose attention does not fit one device's budget trains with the
single-device losses."""

import jax
import numpy as np
import optax
import pytest

import titanax as tx
from examples.gpt_small_tp import model as gpt
from examples.gpt_small_tp import train as example
from tests.integration.examples_run import SMALL_GPT

# 1024 tokens, 4 heads: one device's attention holds (4, 1024, 1024) float32 scores (16 MiB)
# several times over in its forward and backward pass.
CFG = gpt.GPTConfig(seq_len=1024, d_model=32, heads=4, layers=1)
BUDGET = 32 * 2**20  # the attention's temporary memory we allow a device (bytes)
MiB = 2**20


def test_attention_fits_the_budget_only_when_the_sequence_is_split():
    """Compiled temporary bytes of one attention (forward and backward) per device: the
    whole 1024-token sequence on one device exceeds the budget; split over seq=4, ring and
    Ulysses fit it (ring holds one block of scores at a time, Ulysses 1/N of them)."""
    one = example.attention_temp_bytes(CFG, 1)
    mesh = tx.mesh(devices=jax.devices()[:4], seq=4)
    split = {name: example.attention_temp_bytes(CFG, 1, mesh, name) for name in ("ring", "ulysses")}
    print(
        f"attention temp bytes, {CFG.seq_len} tokens, {CFG.heads} heads: one device "
        f"{one / MiB:.1f} MiB; per device with seq=4: "
        + ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in split.items())
    )
    assert one > BUDGET
    assert one >= 3 * CFG.heads * CFG.seq_len**2 * 4  # scores, probabilities, their gradient
    assert split["ring"] < BUDGET and split["ring"] <= one / 8
    assert split["ulysses"] < BUDGET and split["ulysses"] <= 1.1 * one / 4


def losses(mesh, attention, steps=3, batch_size=4):
    train, _ = example.make_steps(CFG, mesh, attention=attention)
    state = tx.TrainState.create(gpt.init(jax.random.key(0), CFG), optax.adamw(3e-3))
    data = gpt.corpus()
    out = []
    for i in range(steps):
        tokens = gpt.windows(data, batch_size, CFG.seq_len + 1, np.random.default_rng(i))
        state, metrics = train(state, example.as_batch(tokens, mesh))
        out.append(float(metrics["loss"]))
    return out, state


@pytest.fixture(scope="module")
def single_device():
    return losses(tx.mesh(devices=jax.devices()[:1], data=1, model=1), "ring")


@pytest.mark.parametrize("attention", ["ring", "ulysses"])
def test_data_x_seq_training_matches_one_device(single_device, attention):
    """Mesh data=2 x seq=4: the learned position embedding reads the global positions of
    each device's chunks (tx.context_positions), the attention crosses devices, and the
    losses and parameters after three AdamW steps are the single-device ones."""
    ref_losses, ref_state = single_device
    mesh = tx.mesh(data=2, model=1, seq=4)
    got, state = losses(mesh, attention)
    print(f"{attention}: losses {got} vs one device {ref_losses}")
    np.testing.assert_allclose(got, ref_losses, atol=1e-5, rtol=0)
    assert got[-1] < got[0]  # it learns (so the comparison is not of constants)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_example_main_runs_with_seq(capsys):
    val = example.main(
        ["--steps", "2", "--mesh", "data=2,model=1", "--seq", "4", "--attention", "ulysses"]
        + SMALL_GPT
    )
    out = capsys.readouterr().out
    assert "ulysses attention over seq" in out and "'seq': 4" in out and np.isfinite(val)


def test_seq_given_twice_must_agree():
    cfg = example.Config(mesh="data=2,seq=2", seq=4)
    with pytest.raises(tx.MeshError, match="disagree"):
        example.mesh_axes(cfg)
    assert example.mesh_axes(example.Config(mesh="data=2,model=1", seq=4))["seq"] == 4
