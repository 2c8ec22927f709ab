"""A Llama layer under TP: q/k/v and gate/up computed with one matmul each (kernels stacked
in the model, parameters kept separate) cost exactly the Megatron minimum over ``model``,
counted in the compiled HLO, and compute the unsharded layer's loss and gradients."""

import pytest

from tests.benchmarks import bench_tp_fusion as bench

ONE = bench.CFG._replace(layers=1)  # per layer = per step; one layer compiles fastest
GQA = bench.GQA._replace(layers=1)


def _activation_bytes(cfg, data):
    return (cfg.batch // data) * cfg.seq * cfg.d_model * 4


@pytest.mark.parametrize("mesh", ["model=4", "data=2 x model=4"])
def test_stacked_projections_cost_the_megatron_minimum(mesh):
    r = bench.measure("stacked", ONE, bench.meshes()[mesh])
    data = 2 if mesh.startswith("data") else 1
    # Forward: after attention and after the MLP; backward: before each. Nothing else.
    assert r["activation_all_reduces"] == 4, r
    assert r["other"] == [], r
    assert r["bytes"] == r["minimum"] == 4 * _activation_bytes(ONE, data)
    assert r["grad_error"] < 1e-5 and r["loss_error"] < 1e-6, r


def test_separate_projections_all_reduce_each_input_gradient():
    """What the fusion removes: XLA:CPU all-reduces the input-gradient partial sum of each
    of q, k, v, gate and up separately (7 activation all-reduces a layer, not 4). If a
    jaxlib starts reassociating them, this fails: update docs/tensor_parallel.md."""
    r = bench.measure("separate", ONE, bench.meshes()["model=4"])
    assert r["activation_all_reduces"] == 7, r
    assert r["bytes"] == 7 * _activation_bytes(ONE, 1)
    assert r["grad_error"] < 1e-5, r


def test_fewer_kv_heads_than_devices_repeated_then_stacked():
    """2 KV heads on model=4: k/v kernels replicated, each head repeated to one copy per
    device inside the model. Activations: the minimum; besides them only the k/v kernels'
    gradients are summed over their copies (sized by the kernels, not by the tokens)."""
    r = bench.measure("stacked", GQA, bench.meshes()["model=4"])
    assert r["activation_all_reduces"] == 4, r
    assert r["activation_bytes"] == r["minimum"] == 4 * _activation_bytes(GQA, 1)
    kernel = GQA.d_model * GQA.kv_heads * GQA.head_dim * 4
    assert 0 < r["other_bytes"] <= 2 * 2 * kernel, r
    assert r["grad_error"] < 1e-5, r
