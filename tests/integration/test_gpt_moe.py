"""The MoE GPT example: on data x expert it trains as the one-device model does."""

import dataclasses

import numpy as np

import titanax as tx
from examples.gpt_moe import train as example
from examples.gpt_small_tp import model as gpt

CFG = example.MoEConfig(
    gpt=gpt.GPTConfig(seq_len=32, d_model=32, heads=2, layers=2), hidden=64, capacity_factor=None
)


def test_data_x_expert_trains_as_one_device_without_dropping():
    # The load-balancing loss is computed per device's tokens (f_e * P_e of each group, then
    # averaged), which is not the one-device loss of the whole batch: compared without it.
    # The z-loss is a mean over tokens, the same either way.
    cfg = dataclasses.replace(CFG, aux_weight=0.0)
    _, ref, ref_dropped = example.train(cfg, None, steps=10, batch_size=8)
    _, got, dropped = example.train(cfg, tx.mesh(data=2, expert=4), steps=10, batch_size=8)
    print(
        f"losses {ref[0]:.4f} -> {ref[-1]:.4f}; max |diff| {np.max(np.abs(np.subtract(got, ref))):.1e}"
    )
    assert ref_dropped == dropped == 0
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert ref[-1] < ref[0] - 0.5  # it learned


def test_a_capacity_drops_and_still_trains():
    cfg = dataclasses.replace(CFG, capacity_factor=1.0)
    _, losses, dropped = example.train(cfg, tx.mesh(data=2, expert=4), steps=6, batch_size=8)
    assignments = 6 * 8 * 32 * cfg.k * cfg.gpt.layers
    print(f"dropped {dropped} of {assignments}")
    assert 0 < dropped < assignments and losses[-1] < losses[0]
