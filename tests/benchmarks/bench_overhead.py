"""Overhead of a Titanax step against the same step hand-written with jit + shard_map.

Timings are printed, never asserted: simulated devices share two cores, so only
ratios measured in one run mean anything. Run with `make bench`.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import titanax as tx
from examples.mnist_dp import train as example


def _time(fn, state, batch, steps):
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = fn(state, batch)
    jax.block_until_ready((state, m))
    return (time.perf_counter() - t) / steps, state


def test_data_parallel_step_overhead():
    mesh = tx.mesh(data=8)
    x, y = example.load_digits()[:2]
    batch = (x[:128], y[:128])
    make = lambda: tx.TrainState.create(  # noqa: E731
        example.init_params(jax.random.key(0), (64, 128, 128, 10)), optax.adam(1e-3)
    )

    titanax_step = tx.data_parallel(example.train_step, mesh=mesh)

    def body(state, batch):  # the same step, by hand
        loss, grads = jax.value_and_grad(example.loss_fn)(state.params, batch)
        grads = jax.lax.pmean(grads, "data")
        return state.apply_gradients(grads), {"loss": jax.lax.pmean(loss, "data")}

    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    hand = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False),
        in_shardings=(rep, dat),
        donate_argnums=0,
    )
    placed = jax.device_put(batch, dat)
    state = jax.device_put(make(), rep)

    def compile_seconds(fn):
        times = []
        for _ in range(3):
            jax.clear_caches()
            t0 = time.perf_counter()
            fn.lower(state, placed).compile()
            times.append(time.perf_counter() - t0)
        return min(times)

    jax.config.update("jax_enable_compilation_cache", False)  # measure real compiles
    try:
        compile_tx, compile_hand = compile_seconds(titanax_step), compile_seconds(hand)
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    t0 = time.perf_counter()
    s_tx = titanax_step(make(), batch)[0]
    first_call = time.perf_counter() - t0
    s_hand = hand(jax.device_put(make(), rep), placed)[0]

    ratios = []
    for _ in range(7):
        t_tx, s_tx = _time(titanax_step, s_tx, placed, 100)
        t_hand, s_hand = _time(hand, s_hand, placed, 100)
        ratios.append(t_tx / t_hand)
    print(
        f"\nDP step (MNIST MLP, mesh data=8): Titanax {t_tx * 1e3:.3f} ms, hand-written "
        f"{t_hand * 1e3:.3f} ms; median ratio over 7 alternating runs {statistics.median(ratios):.3f}"
        f"\ntrace + lower + compile: Titanax {compile_tx:.3f} s, hand-written "
        f"{compile_hand:.3f} s; ratio {compile_tx / compile_hand:.2f}"
        f"\nTitanax first call (placement, compile, replica check): {first_call:.3f} s"
    )
    np.testing.assert_allclose(
        jax.tree.leaves(s_tx.params)[0], jax.tree.leaves(s_hand.params)[0], rtol=1e-5, atol=1e-6
    )  # same program, same numbers
    assert jnp.isfinite(jax.tree.leaves(s_tx.params)[0]).all()
