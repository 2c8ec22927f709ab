"""Overhead of Titanax steps against the same steps hand-written with jit + shard_map.

Timings are printed, never asserted: simulated devices share two cores, so only
ratios measured in one run mean anything. Run with `make bench`.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import titanax as tx
from examples.gpt_small_tp import model as gpt
from examples.gpt_small_tp import train as gpt_example
from examples.mnist_dp import train as mnist


def _time(fn, state, batch, steps):
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = fn(state, batch)
    jax.block_until_ready((state, m))
    return (time.perf_counter() - t) / steps, state


def _compile_seconds(fn, *args):
    """Best of 3 trace + lower + compile, with the persistent cache off."""
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        times = []
        for _ in range(3):
            jax.clear_caches()
            t0 = time.perf_counter()
            fn.lower(*args).compile()
            times.append(time.perf_counter() - t0)
        return min(times)
    finally:
        jax.config.update("jax_enable_compilation_cache", True)


def _result(t_tx, t_hand, ratios, c_tx, c_hand):
    """The figures the report prints for one step (the times of the last round)."""
    return {
        "step_ms": t_tx * 1e3,
        "hand_step_ms": t_hand * 1e3,
        "step_ratio": statistics.median(ratios),
        "compile_s": c_tx,
        "hand_compile_s": c_hand,
        "compile_ratio": c_tx / c_hand,
    }


def compare(name, titanax_step, hand_step, make_state, shardings, batch, steps, rounds=7):
    """Median step-time ratio over alternating runs, and the compile-time ratio."""
    state_sharding, batch_sharding = shardings
    placed = jax.device_put(batch, batch_sharding)
    state = jax.device_put(make_state(), state_sharding)
    c_tx = _compile_seconds(titanax_step, state, placed)
    c_hand = _compile_seconds(hand_step, state, placed)
    s_tx = titanax_step(make_state(), batch)[0]
    s_hand = hand_step(jax.device_put(make_state(), state_sharding), placed)[0]
    ratios = []
    for _ in range(rounds):
        t_tx, s_tx = _time(titanax_step, s_tx, placed, steps)
        t_hand, s_hand = _time(hand_step, s_hand, placed, steps)
        ratios.append(t_tx / t_hand)
    print(
        f"\n{name}: step Titanax {t_tx * 1e3:.2f} ms, hand-written {t_hand * 1e3:.2f} ms; "
        f"median ratio over {rounds} alternating runs {statistics.median(ratios):.3f}"
        f"\n{name}: trace + lower + compile Titanax {c_tx:.3f} s, hand-written {c_hand:.3f} s; "
        f"ratio {c_tx / c_hand:.2f}"
    )
    a, b = jax.tree.leaves(s_tx.params)[0], jax.tree.leaves(s_hand.params)[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # the same program: the same numbers
    return _result(t_tx, t_hand, ratios, c_tx, c_hand)


def _mnist_dp():
    """The MNIST MLP DP problem: mesh, data, a state maker, and the step written by hand
    (jit + shard_map) with its batch sharding."""
    mesh = tx.mesh(data=8)
    x, y = mnist.load_digits()[:2]
    optimizer = optax.adam(1e-3)

    def make():
        params = mnist.init_params(jax.random.key(0), (64, 128, 128, 10))
        return tx.TrainState.create(params, optimizer)

    def body(state, batch):  # the same step, by hand
        loss, grads = jax.value_and_grad(mnist.loss_fn)(state.params, batch)
        grads = jax.lax.pmean(grads, "data")
        return state.apply_gradients(grads), {"loss": jax.lax.pmean(loss, "data")}

    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    hand = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False),
        in_shardings=(rep, dat),
        donate_argnums=0,
    )
    return mesh, (x, y), make, hand, (rep, dat)


def measure_dp():
    """Titanax DP step against jit + shard_map by hand (MNIST MLP, data=8)."""
    mesh, (x, y), make, hand, shardings = _mnist_dp()
    titanax_step = tx.data_parallel(mnist.train_step, mesh=mesh)
    batch = (x[:128], y[:128])
    return compare("DP (MNIST MLP, data=8)", titanax_step, hand, make, shardings, batch, steps=100)


def measure_host_batches(steps=100, rounds=7):
    """A call with host (numpy) batches, as tx.data.Loader and every example yield them,
    against ``jax.device_put(batch)`` plus the hand-written compiled call (MNIST MLP, data=8).

    The other rows time pre-placed batches; this one times what users run.
    """
    mesh, (x, y), make, compiled, (rep, dat) = _mnist_dp()
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 1024, 128)]

    def hand(state, batch):
        return compiled(state, jax.device_put(batch, dat))

    titanax_step = tx.data_parallel(mnist.train_step, mesh=mesh)

    def run(fn, state):
        jax.block_until_ready(state)
        t = time.perf_counter()
        for k in range(steps):
            state, m = fn(state, batches[k % len(batches)])
        jax.block_until_ready((state, m))
        return (time.perf_counter() - t) / steps, state

    s_tx, s_hand = (
        titanax_step(make(), batches[0])[0],
        hand(jax.device_put(make(), rep), batches[0])[0],
    )
    ratios = []
    for _ in range(rounds):
        t_tx, s_tx = run(titanax_step, s_tx)
        t_hand, s_hand = run(hand, s_hand)
        ratios.append(t_tx / t_hand)
    print(
        f"\nDP, host batches: Titanax {t_tx * 1e3:.3f} ms, device_put + compiled call "
        f"{t_hand * 1e3:.3f} ms; median ratio over {rounds} runs {statistics.median(ratios):.3f}"
    )
    a, b = jax.tree.leaves(s_tx.params)[0], jax.tree.leaves(s_hand.params)[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    return {
        "step_ms": t_tx * 1e3,
        "hand_step_ms": t_hand * 1e3,
        "step_ratio": statistics.median(ratios),
    }


def test_host_batch_overhead():
    measure_host_batches(steps=20, rounds=2)


def measure_analysis(repeats=5, compile=True):
    """Trace-time cost of the forgotten-reduction check: the dataflow analysis of the traced
    body (`titanax.parallel.varying`), against tracing the body and compiling the program."""
    from titanax.parallel.varying import varying_axes

    cfg, tokens, make = _gpt()
    rows = []
    for name, mesh, zero in (
        ("DP x TP, GPT 2x128", tx.mesh(data=2, model=4), 0),
        ("ZeRO-3, GPT 2x128", tx.mesh(data=8, model=1), 3),
    ):
        step, _ = gpt_example.make_steps(cfg, mesh, zero=zero)
        state = make()
        t0 = time.perf_counter()
        entry = step._entry((state, tokens))
        entry.jitted  # noqa: B018 (traces the body and runs the checks)
        build = time.perf_counter() - t0
        analysis = min(
            _timed(lambda e=entry: varying_axes(e.jaxpr.jaxpr, e.input_axes))
            for _ in range(repeats)
        )
        compile_s = _compile_seconds(step, state, tokens) if compile else float("nan")
        eqns = _count_eqns(entry.jaxpr.jaxpr)
        rows.append((name, eqns, analysis * 1e3, build, compile_s))
        print(
            f"\n{name}: analysis of {eqns} equations {analysis * 1e3:.1f} ms; trace + checks "
            f"{build:.2f} s; trace + lower + compile {compile_s:.2f} s"
        )
    return rows


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _count_eqns(jaxpr):
    """Equations of ``jaxpr`` and of every jaxpr nested in it."""
    from jax.extend import core

    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, core.ClosedJaxpr):
                    n += _count_eqns(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    n += _count_eqns(sub)
    return n


def test_analysis_cost():
    measure_analysis(repeats=1, compile=False)


def _gpt():
    """The GPT of the TP, DP x TP and ZeRO-3 rows: config, a batch, and a state maker."""
    cfg = gpt.GPTConfig(seq_len=64, d_model=128, heads=4, layers=2)
    tokens = gpt.windows(gpt.corpus(), 8, cfg.seq_len + 1, np.random.default_rng(0))
    optimizer = optax.adam(1e-3)  # one object: the optimizer is static, part of the treedef

    def make():
        return tx.TrainState.create(gpt.init(jax.random.key(0), cfg), optimizer)

    return cfg, tokens, make


def measure_dp_tp():
    """Titanax DP x TP step against jit + NamedSharding + shard_map by hand (GPT)."""
    cfg, tokens, make = _gpt()
    mesh = tx.mesh(data=2, model=4)

    titanax_step, _ = gpt_example.make_steps(cfg, mesh)

    def body(state, tokens):  # by hand: jit + NamedSharding + shard_map, manual over data
        loss, grads = jax.value_and_grad(gpt.loss_fn)(state.params, tokens, cfg)
        grads = jax.lax.pmean(grads, "data")
        return state.apply_gradients(grads), {"loss": jax.lax.pmean(loss, "data")}

    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Explicit, AxisType.Auto))
    specs = gpt_example.gpt_rules().specs(make(), mesh)
    state_sharding = jax.tree.map(
        lambda s: NamedSharding(auto, s), specs, is_leaf=lambda s: isinstance(s, P)
    )
    batch_sharding = NamedSharding(auto, P("data"))
    hand = jax.jit(
        jax.shard_map(
            body,
            mesh=auto,
            in_specs=(P(), P("data")),
            out_specs=P(),
            axis_names={"data"},
            check_vma=False,
        ),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, NamedSharding(auto, P())),
        donate_argnums=0,
    )
    return compare(
        "DP x TP (GPT 2x128, data=2 x model=4)",
        titanax_step,
        hand,
        make,
        (state_sharding, batch_sharding),
        tokens,
        steps=10,
        rounds=5,
    )


def test_data_parallel_step_overhead():
    measure_dp()


def test_dp_x_tp_step_overhead():
    measure_dp_tp()


def measure_tp():
    """Titanax TP step (tensor_parallel alone) against jit with in/out shardings by hand (GPT)."""
    cfg, tokens, make = _gpt()
    mesh = tx.mesh(devices=jax.devices()[:4], model=4)

    def body(state, tokens):  # global view: XLA partitions from the declared layouts
        loss, grads = jax.value_and_grad(gpt.loss_fn)(state.params, tokens, cfg)
        return state.apply_gradients(grads), {"loss": loss}

    titanax_step = tx.tensor_parallel(gpt_example.gpt_rules(), mesh=mesh)(body)
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,))
    specs = gpt_example.gpt_rules().specs(make(), mesh)
    state_sharding = jax.tree.map(
        lambda s: NamedSharding(auto, s), specs, is_leaf=lambda s: isinstance(s, P)
    )
    rep = NamedSharding(auto, P())
    hand = jax.jit(
        body,
        in_shardings=(state_sharding, rep),
        out_shardings=(state_sharding, rep),
        donate_argnums=0,
    )
    return compare(
        "TP (GPT 2x128, model=4)",
        titanax_step,
        hand,
        make,
        (state_sharding, rep),
        tokens,
        steps=10,
        rounds=5,
    )


def measure_fsdp():
    """Titanax ZeRO-3 step against the same step written with shard_map by hand (GPT, data=8)."""
    cfg, tokens, make = _gpt()
    mesh = tx.mesh(data=8, model=1)  # the example composes with TP; model=1 here

    titanax_step, _ = gpt_example.make_steps(cfg, mesh, zero=3)
    specs = titanax_step.specs(make(), tokens)[0][0]  # the layout: data on one dimension
    is_spec = lambda s: isinstance(s, P)  # noqa: E731
    dims = jax.tree.map(
        lambda s: next((d for d, e in enumerate(s) if e == "data"), -1),
        specs.params,
        is_leaf=is_spec,
    )

    block_dims = jax.tree.map(lambda d: d - 1 if d > 0 else -1, dims["h"])  # one block

    def gather(tree):  # by hand: the model calls it with one block's shards, or the others
        same = jax.tree.structure(tree) == jax.tree.structure(block_dims)
        where = block_dims if same else {k: dims[k] for k in tree}
        return jax.tree.map(
            lambda w, d: w if d < 0 else jax.lax.all_gather(w, "data", axis=d, tiled=True),
            tree,
            where,
        )

    def body(state, tokens):  # by hand: a block at a time, as the example's ZeRO-3 step
        # the transpose of all_gather is psum_scatter (a sum over the replicas); replicated
        # leaves' gradients stay per replica (check_vma=False): averaged here
        loss, grads = jax.value_and_grad(gpt.loss_fn)(state.params, tokens, cfg, gather)
        grads = jax.tree.map(lambda g, d: jax.lax.pmean(g, "data") if d < 0 else g / 8, grads, dims)
        return state.apply_gradients(grads), {"loss": jax.lax.pmean(loss, "data")}

    state_sharding = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)
    batch_sharding, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    hand = jax.jit(
        jax.shard_map(
            body, mesh=mesh, in_specs=(specs, P("data")), out_specs=(specs, P()), check_vma=False
        ),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, rep),
        donate_argnums=0,
    )
    return compare(
        "ZeRO-3 (GPT 2x128, data=8)",
        titanax_step,
        hand,
        make,
        (state_sharding, batch_sharding),
        tokens,
        steps=10,
        rounds=5,
    )


def test_fsdp_step_overhead():
    measure_fsdp()


D_PP, H_PP, M_PP, P_PP = 256, 512, 8, 4


def _pp_stage(p, x):
    return x + jnp.tanh(x @ p["w"]) @ p["w2"]


def _pp_loss(_, y, t):
    return jnp.mean((y - t) ** 2)


def hand_gpipe(mesh):
    """GPipe written by hand as in JAX's docs: a forward scan over m + p - 1 ticks under
    shard_map, passing activations with ppermute; jax.value_and_grad makes the backward."""
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,))
    p = auto.shape["stage"]

    def per_device(params, xs, ts):
        params = jax.tree.map(lambda a: a[0], params)
        idx = jax.lax.axis_index("stage")
        carry = (
            jax.lax.pcast(jnp.zeros_like(xs[0]), "stage", to="varying"),
            jax.lax.pcast(jnp.zeros_like(xs), "stage", to="varying"),
        )

        def tick(carry, t):
            state, outs = carry
            out = _pp_stage(params, jnp.where(idx == 0, xs[jnp.minimum(t, M_PP - 1)], state))
            k = t - (p - 1)
            outs = jnp.where(
                (idx == p - 1) & (k >= 0), outs.at[jnp.clip(k, 0, M_PP - 1)].set(out), outs
            )
            return (jax.lax.ppermute(out, "stage", [(i, i + 1) for i in range(p - 1)]), outs), None

        (_, outs), _ = jax.lax.scan(tick, carry, jnp.arange(M_PP + p - 1))
        mine = jnp.mean(jax.vmap(lambda y, t: _pp_loss(None, y, t))(outs, ts))
        return jax.lax.psum(jnp.where(idx == p - 1, mine, 0.0), "stage")

    f = jax.shard_map(per_device, mesh=auto, in_specs=(P("stage"), P(), P()), out_specs=P())

    def value_and_grad(sp, x, t):
        xs, ts = x.reshape(M_PP, -1, D_PP), t.reshape(M_PP, -1, D_PP)
        value, (g_sp, g_xs) = jax.value_and_grad(f, argnums=(0, 1))(sp, xs, ts)
        return value, (g_sp, g_xs.reshape(x.shape))

    return jax.jit(value_and_grad)


def measure_pp(rounds=5, steps=20):
    """Titanax's GPipe schedule against GPipe by hand (p=4, m=8), both value-and-grad."""
    mesh = tx.mesh(devices=jax.devices()[:P_PP], stage=P_PP)
    rng = np.random.default_rng(0)
    sp = {
        "w": jnp.asarray(rng.normal(size=(P_PP, D_PP, H_PP)) * 0.05, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(P_PP, H_PP, D_PP)) * 0.05, jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(M_PP * 8, D_PP)), jnp.float32)
    t = jnp.zeros((M_PP * 8, D_PP))
    pipe = tx.pipeline(_pp_stage, schedule="gpipe", microbatches=M_PP, loss=_pp_loss, mesh=mesh)
    hand = hand_gpipe(mesh)
    ours, theirs = pipe(sp, x, t), hand(sp, x, t)
    for a, b in zip(jax.tree.leaves(ours[:2]), jax.tree.leaves(theirs)):  # same numbers
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    def timed(fn):
        jax.block_until_ready(fn(sp, x, t))
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn(sp, x, t)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / steps

    ratios = []
    for _ in range(rounds):
        t_tx, t_hand = timed(pipe), timed(hand)
        ratios.append(t_tx / t_hand)
    with jax.set_mesh(mesh):
        c_tx = _compile_seconds(jax.jit(pipe), sp, x, t)
    c_hand = _compile_seconds(hand, sp, x, t)
    print(
        f"\nPP (GPipe, p=4, m=8): Titanax {t_tx * 1e3:.2f} ms, by hand {t_hand * 1e3:.2f} ms; "
        f"median ratio {statistics.median(ratios):.3f}; compile ratio {c_tx / c_hand:.2f}"
    )
    return _result(t_tx, t_hand, ratios, c_tx, c_hand)


def test_tp_step_overhead():
    measure_tp()


def test_pp_step_overhead():
    measure_pp(rounds=2, steps=5)
