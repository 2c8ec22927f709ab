"""`make bench`: runs the benchmarks and writes docs/performance.md (and its plot).

Every number in the report is measured by this run. On simulated CPU devices only
ratios measured in one run, HLO bytes, memory and FLOP counts mean something;
wall-clock speed-ups cannot be seen. ``--gpu`` runs the same model on the
accelerators present and adds tokens/s and MFU.

    python tests/benchmarks/report.py [--gpu] [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup(gpu: bool) -> None:
    os.environ.setdefault("NPROC", "32")  # CPU collectives need threads (see titanax/__init__)
    import jax

    if not gpu:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", 8)
    sys.path.insert(0, ROOT)


def _per_step(text: str, mesh) -> list:
    """The collectives of a compiled program, each as many times as it runs in one step (a
    collective in a ``lax.scan``'s loop body once per iteration)."""
    from tests.benchmarks.bench_fsdp_layers import loop_collectives

    return [c for c, n in loop_collectives(text, mesh) for _ in range(n)]


def communication() -> list[tuple[str, str, int, int]]:
    """HLO collective bytes per step against the analytic minimum of each layout."""
    import jax
    import numpy as np
    import optax

    import titanax as tx
    from examples.gpt_small_tp import model as gpt
    from examples.gpt_small_tp import train as gpt_example
    from examples.mnist_dp import train as mnist
    from titanax.parallel import hlo
    from titanax.parallel.rules import bytes_per_device

    rows = []
    # DP: one all-reduce of the gradient (parameter bytes) and the loss (4 bytes), per step.
    mesh = tx.mesh(data=8)
    params = mnist.init_params(jax.random.key(0), (64, 128, 128, 10))
    state = tx.TrainState.create(params, optax.adam(1e-3))
    step = tx.data_parallel(mnist.train_step, mesh=mesh)
    x, y = mnist.load_digits()[:2]
    found = hlo.collectives(step.lower(state, (x[:128], y[:128])).compile().as_text(), mesh)
    param_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
    rows.append(
        (
            "DP, MNIST MLP, data=8",
            "all-reduce over data",
            sum(c.bytes for c in found),
            param_bytes + 4,
        )
    )

    # Megatron TP, GPT under data=2 x model=4: per block 2 activation all-reduces forward
    # (attention output, MLP output) and 2 backward (their input gradients); the DP
    # reduction carries each device's gradient shards once.
    cfg = gpt.GPTConfig(seq_len=64, d_model=128, heads=4, layers=2)
    mesh = tx.mesh(data=2, model=4)
    train, _ = gpt_example.make_steps(cfg, mesh)
    state = tx.TrainState.create(gpt.init(jax.random.key(0), cfg), optax.adam(1e-3))
    tokens = np.zeros((8, cfg.seq_len + 1), np.int32)
    found = _per_step(train.lower(state, tokens).compile().as_text(), mesh)
    activation = (8 // 2) * cfg.seq_len * cfg.d_model * 4
    model = sum(c.bytes for c in found if c.axes == ("model",) and c.kind == "all-reduce")
    scalars = sum(4 for c in found if c.axes == ("model",) for s in c.shapes if s == "f32[]")
    rows.append(
        (
            "DP x TP, GPT 2 layers, data=2 x model=4",
            "all-reduce over model",
            model - scalars,
            4 * cfg.layers * activation,
        )
    )
    specs = jax.tree.leaves(
        gpt_example.gpt_rules().specs(state.params, mesh),
        is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec),
    )
    shard_bytes = sum(
        bytes_per_device(a.shape, a.dtype, spec, mesh)
        for a, spec in zip(jax.tree.leaves(state.params), specs)
    )
    data = sum(c.bytes for c in found if c.axes == ("data",))
    rows.append(
        ("DP x TP, GPT 2 layers, data=2 x model=4", "all-reduce over data", data, shard_bytes + 4)
    )

    # ZeRO-3 on data=8, a block at a time: each split block leaf gathered whole twice (the
    # forward pass, and again in the backward pass under jax.checkpoint), the other split
    # leaves once; each whole gradient reduce-scattered once; replicated small leaves'
    # gradients and the loss all-reduced.
    mesh = tx.mesh(data=8, model=1)
    train, _ = gpt_example.make_steps(cfg, mesh, zero=3)
    state = tx.TrainState.create(gpt.init(jax.random.key(0), cfg), optax.adam(1e-3))
    found = _per_step(train.lower(state, tokens).compile().as_text(), mesh)
    in_specs = train.specs(state, tokens)[0][0].params
    is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)  # noqa: E731
    pairs = list(zip(jax.tree.leaves(state.params), jax.tree.leaves(in_specs, is_leaf=is_spec)))
    split = sum(a.nbytes for a, s in pairs if "data" in s)
    small = sum(a.nbytes for a, s in pairs if "data" not in s)
    blocks = sum(
        a.nbytes
        for a, s in zip(
            jax.tree.leaves(state.params["h"]), jax.tree.leaves(in_specs["h"], is_leaf=is_spec)
        )
        if "data" in s
    )
    name = "ZeRO-3 (a block at a time), GPT 2 layers, data=8"
    for kind, minimum in (
        ("all-gather", split + blocks),
        ("reduce-scatter", split),
        ("all-reduce", small + 4),
    ):
        got = sum(c.bytes for c in found if c.kind == kind)
        rows.append((name, f"{kind} over data", got, minimum))
    return rows


def fsdp_memory() -> list[tuple[str, int, int, int, int]]:
    """Per-device state bytes (placed arrays) and compiled memory: DP, ZeRO-1, ZeRO-3."""
    import jax
    import numpy as np
    import optax

    import titanax as tx
    from examples.gpt_small_tp import model as gpt
    from examples.gpt_small_tp import train as gpt_example

    cfg = gpt.GPTConfig(seq_len=64, d_model=128, heads=4, layers=2)
    tokens = np.zeros((8, cfg.seq_len + 1), np.int32)
    mesh = tx.mesh(data=8, model=1)
    rows = []
    for name, zero in (("data_parallel", 0), ("ZeRO-1", 1), ("ZeRO-3", 3)):
        step, _ = gpt_example.make_steps(cfg, mesh, zero=zero)
        state = tx.TrainState.create(gpt.init(jax.random.key(0), cfg), optax.adam(1e-3))
        placed = step.place(state, tokens)[0]
        on_device0 = sum(
            s.data.nbytes
            for x in jax.tree.leaves(placed)
            for s in x.addressable_shards
            if s.device == mesh.devices.flat[0]
        )
        total = sum(x.nbytes for x in jax.tree.leaves(placed))
        m = step.lower(placed, tokens).compile().memory_analysis()
        rows.append((name, total, on_device0, m.argument_size_in_bytes, m.temp_size_in_bytes))
    return rows


def scaling() -> list[tuple[int, float, float]]:
    """Per-device FLOPs of the MNIST step at a fixed global batch, on 1, 2, 4, 8 devices,
    under data_parallel and under fully_sharded (ZeRO-3)."""
    import jax
    import optax

    import titanax as tx
    from examples.mnist_dp import train as mnist

    def zero3_step(state, batch):
        params = tx.gather_params(state.params, "data")
        loss, grads = jax.value_and_grad(mnist.loss_fn)(params, batch)
        return state.apply_gradients(tx.scatter_grads(grads, "data")), tx.pmean(loss, "data")

    x, y = mnist.load_digits()[:2]
    out = []
    for n in (1, 2, 4, 8):
        mesh = tx.mesh(devices=jax.devices()[:n], data=n)
        params = mnist.init_params(jax.random.key(0), (64, 128, 128, 10))
        state = tx.TrainState.create(params, optax.adam(1e-3))
        dp = tx.data_parallel(mnist.train_step, mesh=mesh)
        fs = tx.fully_sharded(zero3_step, mesh=mesh)
        batch = (x[:128], y[:128])
        out.append(
            (n, tx.metrics.step_flops(dp, state, batch), tx.metrics.step_flops(fs, state, batch))
        )
    return out


def gpu_throughput() -> str:
    """Tokens/s and MFU of the GPT DP x TP step on the accelerators present (``--gpu``)."""
    import jax
    import numpy as np
    import optax

    import titanax as tx
    from examples.gpt_small_tp import model as gpt
    from examples.gpt_small_tp import train as gpt_example

    n = len(jax.devices())
    model_axis = 2 if n % 2 == 0 and n > 1 else 1
    mesh = tx.mesh(data=-1, model=model_axis)
    cfg = gpt.GPTConfig(seq_len=512, d_model=1024, heads=16, layers=8)
    batch = 8 * mesh.shape["data"]
    train, _ = gpt_example.make_steps(cfg, mesh)
    state = tx.TrainState.create(gpt.init(jax.random.key(0), cfg), optax.adamw(1e-4))
    tokens = np.random.default_rng(0).integers(0, 256, (batch, cfg.seq_len + 1)).astype(np.int32)
    flops = tx.metrics.step_flops(train, state, tokens)
    state, m = train(state, tokens)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    steps = 20
    for _ in range(steps):
        state, m = train(state, tokens)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    tokens_s = batch * cfg.seq_len / dt
    mfu = tx.metrics.mfu(flops, dt) if flops else None
    return (
        f"{jax.devices()[0].device_kind} x {n}, mesh {dict(mesh.shape)}: {dt * 1e3:.1f} ms/step, "
        f"{tokens_s:,.0f} tokens/s, MFU {'n/a' if mfu is None else f'{mfu:.1%}'}"
    )


def plot_pipeline(table: dict, path: str) -> None:
    """Temp memory against microbatches, one line per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, per_m in table.items():
        ms = sorted(per_m)
        ax.plot(ms, [per_m[m][0] / 2**20 for m in ms], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("microbatches m (p = 4)")
    ax.set_ylabel("compiled temp memory (MiB)")
    ax.set_title("Pipeline memory against microbatches")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fsdp_layer_lines(mlp: dict, gpt: dict) -> list[str]:
    """The report's section on ZeRO-3 a layer at a time (`bench_fsdp_layers`)."""
    from tests.benchmarks import bench_fsdp_layers as b

    def runs(gathers: list[int]) -> str:  # [1, 8, 8] -> "1 x 1, 2 x 8"
        return ", ".join(f"{gathers.count(n)} x {n}" for n in sorted(set(gathers)))

    sizes = b.layer_bytes()
    lines = [
        "## ZeRO-3 a layer at a time: memory against depth",
        "",
        "Compiled memory per device (`memory_analysis()`) on `data=8` with Adam, for three",
        "steps of one model whose layers are stacked and run by a `lax.scan`: `data_parallel`;",
        "ZeRO-3 gathering every parameter at the top of the step (`gather_params` before",
        "`value_and_grad`, `scatter_grads` after); ZeRO-3 gathering each layer inside the scan",
        'under `jax.checkpoint` with `vjp="mean"`, the step of `docs/fully_sharded.md` and of',
        "both GPT examples. The MLP is residual, `d=256`, hidden 1024, 64 rows; the GPT is",
        "the example's, `d_model=128`, 64 bytes of context, 8 sequences. ZeRO-3 columns are",
        "ratios to `data_parallel`. All-gathers: ops in the compiled program x times each runs",
        "per step (a gather in a loop body runs once per layer).",
        "",
        "| model | layers | DP temp | DP argument + temp | top: temp | top: argument + temp |"
        " per layer: temp | per layer: argument + temp | per layer: all-gathers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, results in (("MLP", mlp), ("GPT", gpt)):
        for n, dp_t, dp_at, top_t, top_at, per_t, per_at, gathers in b.rows(results):
            lines.append(
                f"| {model} | {n} | {dp_t:,} | {dp_at:,} | {top_t / dp_t:.3f} | "
                f"{top_at / dp_at:.3f} | {per_t / dp_t:.3f} | {per_at / dp_at:.3f} | "
                f"{runs(gathers)} |"
            )
    lines += [
        "",
        f"Temp bytes added per layer, from {b.LAYERS[0]} to {b.LAYERS[-1]} layers, against one"
        " layer's whole parameters and the activation it passes on (per device):",
        "",
        "| model | data_parallel | ZeRO-3, top | ZeRO-3, a layer at a time | a layer's parameters |"
        " its parameters / 8 | the activation it passes on |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, results in (("MLP", mlp), ("GPT", gpt)):
        params, act = sizes[model]
        lines.append(
            f"| {model} | {b.growth(results, 'data_parallel'):,.0f} | "
            f"{b.growth(results, 'ZeRO-3, top'):,.0f} | "
            f"{b.growth(results, 'ZeRO-3, per layer'):,.0f} | {params:,} | {params // 8:,} | "
            f"{act:,} |"
        )
    loop = mlp.get((b.PYTHON_LOOP[0], 8))
    lines += [
        "",
        "Under `data_parallel` each layer adds two or more copies of its parameters (its whole",
        "gradient among them), and the top gather more, since it also holds every whole",
        "parameter: its temp is above `data_parallel`'s at every depth. A layer at a time,",
        "each layer adds the activation the scan saves for the backward pass and its",
        "gradient's shard (its parameters / 8, which `apply_gradients` consumes), plus on the",
        "GPT the whole gradients of its small replicated leaves: no whole parameter.",
    ]
    remat = mlp.get(("data_parallel, remat", 8))
    if remat is not None:
        lines += [
            "",
            "`data_parallel` with the same `jax.checkpoint` around each layer needs "
            f"{remat['temp']:,} B of temp on the 8-layer MLP, against "
            f"{mlp['data_parallel', 8]['temp']:,} B without: the saving is ZeRO-3's, not",
            "recomputation's.",
        ]
    looped = gpt.get(("data_parallel, Python loop", 8))
    if looped is not None:
        per = gpt["ZeRO-3, per layer", 8]
        lines += [
            "",
            "The scan costs `data_parallel` some temp memory: the GPT's blocks in a Python loop",
            f"need {looped['temp']:,} B at 8 layers, against {gpt['data_parallel', 8]['temp']:,} B"
            " for the scan. Against that, ZeRO-3 a layer at a time needs "
            f"{per['temp'] / looped['temp']:.3f}x the temp and "
            f"{(per['temp'] + per['arg']) / (looped['temp'] + looped['arg']):.3f}x argument +"
            " temp.",
        ]
    if loop is not None:
        per = mlp["ZeRO-3, per layer", 8]
        lines += [
            "",
            "The scan is what keeps the gathers per layer. The same step with the layers in a",
            f"Python loop (MLP, 8 layers) compiles to {runs(loop['gathers'])} all-gathers and",
            f"{loop['temp']:,} temp bytes, against {per['temp']:,} for the scan: XLA:CPU removes",
            "the optimization barriers that `jax.checkpoint` puts before the recomputation",
            "(its `cse_barrier_expander` pass) and its CSE pass then merges each recomputed",
            "all-gather with the forward one, so every gathered layer is kept from the forward",
            "pass to the backward pass. In a scan the two gathers of a layer are in different",
            "loops, each of a slice chosen by the loop counter: nothing to merge or hoist. See",
            '`docs/fully_sharded.md`, "A layer at a time".',
        ]
    return lines + [""]


def tp_fusion_lines(rows: list[dict]) -> list[str]:
    """The report's section on a Llama layer's projections under TP (`bench_tp_fusion`)."""
    from tests.benchmarks import bench_tp_fusion as b

    c = b.CFG
    names = {
        "separate": "separate q, k, v, gate, up: 5 matmuls",
        "stacked": "separate parameters, kernels stacked in the model: 2 matmuls",
        "interleaved": "fused parameters (Megatron's interleaved qkv, gate_up): 2 matmuls",
    }
    lines = [
        "## Tensor parallelism of a Llama layer: separate and fused projections",
        "",
        "Bytes per device, per layer and step, of the collectives over `model` in the compiled",
        "HLO of `value_and_grad` of a Llama-style decoder layer under `tensor_parallel`",
        f"(`tests/benchmarks/bench_tp_fusion.py`: RMSNorm, RoPE, SwiGLU; d_model {c.d_model},"
        f" {c.heads} query heads of {c.head_dim}, hidden {c.hidden}, {c.seq} positions, a global"
        f" batch of {c.batch}, {c.layers} layers; float32), against Megatron's minimum (Shoeybi"
        " et al. 2019, Sec. 3): 4 all-reduces of the per-replica `(batch, seq, d_model)`"
        " activation per layer (after attention and after the MLP forward, before each"
        " backward). Activation: all-reduces of that shape; other: every other collective over"
        " `model`. Error: the largest gradient difference from the unsharded layer with"
        " separate projections, relative to each leaf's largest entry.",
        "",
        "| projections | KV heads | mesh | activation all-reduces | activation bytes |"
        " other bytes | total | minimum | ratio | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kv = f"{r['kv_heads']}" + (" (k/v replicated)" if r["kv_heads"] % 4 else "")
        lines.append(
            f"| {names[r['variant']]} | {kv} | `{r['mesh']}` | "
            f"{r['activation_all_reduces']:g} | {r['activation_bytes']:,} | "
            f"{r['other_bytes']:,} | {r['bytes']:,} | {r['minimum']:,} | "
            f"{r['bytes'] / r['minimum']:.2f} | {r['grad_error']:.1e} |"
        )
    lines += [
        "",
        "Why separate projections cost more: each of q, k, v (and gate, up) is a matmul whose",
        "input gradient `dy @ W.T` contracts the split dimension, so the SPMD partitioner ends",
        "each with its own all-reduce of a `(batch, seq, d_model)` partial sum, and the sum of",
        "the three (two) comes after them: 7 activation all-reduces a layer when the KV heads",
        "are split. XLA:CPU's `cpu-all-reduce-combiner` then merges independent ones into",
        "tuple all-reduces (fewer ops, the same bytes). The pass that would rewrite",
        "`add(all-reduce(a), all-reduce(b))` into `all-reduce(add(a, b))`",
        "(`AllReduceReassociate`) is not in jaxlib 0.10.2's CPU pipeline, and no flag turns it",
        "on. Stacking the kernels on a head (or hidden) axis that is split the same way for",
        "each makes one matmul, hence one input-gradient partial sum and one all-reduce; the",
        "stacking is local, so it costs no communication. With fewer KV heads than devices",
        "each KV head's kernel is repeated to one copy per device before the stack: the",
        "activations cost the minimum, and the copies' gradients are summed (the other",
        "bytes), a cost of the k/v kernels' size, independent of batch and sequence.",
        "Separate, with k and v replicated, XLA picks its own way for k and v (partial sums of",
        "their attention gradients, all-gathers of their activations or kernels), and not the",
        "same one on the two meshes.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="also measure on the accelerators")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "performance.md"))
    args = parser.parse_args()
    _setup(args.gpu)
    import jax

    from tests.benchmarks import (
        bench_checkpoint,
        bench_fsdp_layers,
        bench_overhead,
        bench_pipeline,
        bench_tp_fusion,
    )

    start = time.perf_counter()
    dp = bench_overhead.measure_dp()
    host = bench_overhead.measure_host_batches()
    analysis = bench_overhead.measure_analysis()
    tp = bench_overhead.measure_tp()
    dptp = bench_overhead.measure_dp_tp()
    pp = bench_overhead.measure_pp()
    fsdp = bench_overhead.measure_fsdp()
    comm = communication()
    fusion = bench_tp_fusion.table()
    memory = fsdp_memory()
    depth_mlp, depth_gpt = bench_fsdp_layers.measure_mlp(), bench_fsdp_layers.measure_gpt()
    merged = bench_fsdp_layers.measure_mlp(layers=(8,), names=bench_fsdp_layers.PYTHON_LOOP)
    depth_mlp.update(merged)
    pipe = bench_pipeline.table()
    grid = bench_pipeline.lockstep_grid()
    scale = scaling()
    ckpt = bench_checkpoint.measure()
    sums = bench_checkpoint.measure_checksums()
    gpu = gpu_throughput() if args.gpu else None
    img = os.path.join(os.path.dirname(args.out), "img", "pipeline_memory.png")
    os.makedirs(os.path.dirname(img), exist_ok=True)
    plot_pipeline(pipe, img)
    elapsed = time.perf_counter() - start

    lines = [
        "# Performance",
        "",
        f"Written by `make bench` (`tests/benchmarks/report.py`) on "
        f"{datetime.date.today().isoformat()}, in {elapsed / 60:.1f} minutes, on "
        f"{len(jax.devices())} {jax.devices()[0].platform} devices"
        + (" (simulated on 2 CPU cores)" if jax.devices()[0].platform == "cpu" else "")
        + ".",
        "Every number below is measured by that run. Simulated devices share two cores, so",
        "only ratios measured in one run, bytes in the compiled HLO, compiled memory and FLOP",
        "counts mean anything here; absolute times do not.",
        "",
        "## Overhead against hand-written JAX",
        "",
        "The same step written with `jax.jit` + `NamedSharding` + `jax.shard_map` by hand,",
        "alternating runs in one process; the step ratio is the median over rounds. Goal:",
        "step <= 1.02, compile <= 1.1.",
        "",
        "| step | Titanax ms | by hand ms | step ratio | Titanax compile s | by hand compile s |"
        " compile ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    overheads = (
        ("DP, MNIST MLP, data=8", dp),
        ("TP, GPT 2x128, model=4", tp),
        ("DP x TP, GPT 2x128, data=2 x model=4", dptp),
        ("PP, GPipe schedule, p=4, m=8 (value and grad)", pp),
        ("ZeRO-3 (fully_sharded), GPT 2x128, data=8", fsdp),
    )
    for name, r in overheads:
        lines.append(
            f"| {name} | {r['step_ms']:.2f} | {r['hand_step_ms']:.2f} | "
            f"{r['step_ratio']:.3f} | {r['compile_s']:.3f} | {r['hand_compile_s']:.3f} | "
            f"{r['compile_ratio']:.2f} |"
        )
    lines += [
        "",
        "With host batches, as `tx.data.Loader` and every example yield them (numpy arrays),",
        "against `jax.device_put(batch, sharding)` plus the same compiled call by hand: what a",
        "training loop really pays per step. Goal: <= 1.05.",
        "",
        "| step | Titanax ms | device_put + call ms | ratio |",
        "|---|---|---|---|",
        f"| DP, MNIST MLP, data=8, numpy batches | {host['step_ms']:.3f} | "
        f"{host['hand_step_ms']:.3f} | {host['step_ratio']:.3f} |",
        "",
        "The forgotten-reduction check is a dataflow analysis of the traced body (which",
        "outputs still vary between replicas), run once when a step is first traced: its cost",
        "against tracing the body and against compiling the program.",
        "",
        "| step | equations (nested included) | analysis ms | trace + checks s |"
        " trace + lower + compile s |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {eqns} | {ms:.1f} | {build:.2f} | {comp:.2f} |"
            for name, eqns, ms, build, comp in analysis
        ],
        "",
        "DP, TP, DP x TP and ZeRO-3 compute the same numbers as the hand-written step (the benchmark",
        "checks it); their steady-state call is a flatten, a dictionary lookup and one",
        "compiled call, so step ratios a few percent away from 1.0 are the machine's noise",
        "(two cores shared by eight simulated devices; rounds of one program vary that much).",
        "Titanax's compile includes tracing the body once to a jaxpr, the dataflow analysis",
        "that decides which outputs still vary between replicas (the forgotten-reduction",
        "check and ZeRO-3's split outputs), and replaying that jaxpr under the final",
        "`shard_map`: the user's Python is traced once.",
        "",
        "PP: the hand-written GPipe is a forward `scan` over m + p - 1 ticks whose backward",
        "JAX derives (every device computes on every tick, bubbles included); Titanax",
        "interprets a schedule table, 2(m + p - 1) ticks for GPipe, each a `lax.switch` over",
        "the actions the schedule uses, two `ppermute`s and buffer writes, and skips the",
        "compute of idle ticks. That interpreter is what runs 1F1B, interleaved and",
        "zero-bubble schedules, which autodiff of a scan cannot express. What made it cost",
        "as much as the hand-written one: the branches see one slot of each buffer and",
        "return only their results (buffers written outside the switch), and the weight",
        "gradient runs in its own `cond` with the float32 accumulator as its only large",
        "operand, so ticks without a W leave the accumulator in place instead of copying it",
        "(the copy was a params-sized memory pass on every tick of every device).",
        "",
        "## Communication against the minimum",
        "",
        "Bytes per device of the collectives in the compiled HLO (`tx.ParallelFunction.explain`)",
        "over the analytic minimum of the layout. DP: the gradient (parameter bytes) and the",
        "loss, once per step. Megatron TP: per transformer block, one all-reduce of the",
        "`(batch, seq, d_model)` activation after attention and one after the MLP in the",
        "forward pass, and one of each input gradient in the backward pass: `4 x layers x",
        "activation bytes`. The DP reduction under TP: each device's gradient shards once.",
        "ZeRO-3, a block at a time: each split block parameter gathered whole twice (the",
        "forward pass, and the backward pass, which gathers the block again under",
        "`jax.checkpoint` instead of keeping it), the other split parameters once, each whole",
        "gradient reduce-scattered once (HLO bytes of a reduce-scatter are its operand), and",
        "an all-reduce of the small replicated leaves' gradients and the loss. A collective in",
        "the loop body of the scan over the blocks counts once per iteration.",
        "",
        "| configuration | collective | HLO bytes per step | minimum | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, kind, got, minimum in comm:
        lines.append(f"| {name} | {kind} | {got:,} | {minimum:,} | {got / minimum:.2f} |")
    lines += [
        "",
        "The GPT's attention uses one fused qkv projection stored `(d, 3, d)`: with three",
        "separate q, k, v projections XLA all-reduced the three input-gradient partial sums",
        "separately in the backward pass (measured ratio 1.50 under `model` before the change).",
        "",
        *tp_fusion_lines(fusion),
        "## Fully sharded data parallelism: memory",
        "",
        "GPT 2 layers x 128 with Adam on `data=8`: the state's bytes in all, the bytes device 0",
        "holds (from the placed arrays' shards), and the compiled step's argument and temp",
        "bytes (`memory_analysis()`). ZeRO-3 and ZeRO-1 train to the same losses as",
        "`data_parallel` (tests: 50 GPT steps, 1e-5 relative per step).",
        "",
        "| step | state bytes | state bytes on device 0 | share | argument bytes | temp bytes |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {total:,} | {dev0:,} | {dev0 / total:.3f} | {arg:,} | {temp:,} |"
            for name, total, dev0, arg, temp in memory
        ],
        "",
        "Leaves under 1024 elements (biases, layer norms, Adam's count) stay replicated, so",
        "ZeRO-3's share is a little above 1/8 = 0.125. ZeRO-3 gathers a block at a time",
        "(below), so its temp memory holds one block's whole parameters, not the model's;",
        "ZeRO-1 keeps whole parameters and splits Adam's moments.",
        "",
        *fsdp_layer_lines(depth_mlp, depth_gpt),
        "## Pipeline schedules",
        "",
        "Time first. The executor runs a schedule as ticks of one SPMD program with a",
        "`ppermute` between them, so a tick lasts as long as its slowest action on any device;",
        "the time it really takes, in the schedule's units (F=1, whole B=2, split B=W=1), is",
        "`Schedule.lockstep_time`, against the ideal `Schedule.total_time` where each device",
        "starts an action as soon as its inputs are ready. Worst ratio over every m from p to",
        "8p (interleaved: multiples of p), and the lockstep bubble at m = 8p:",
        "",
        "| schedule | p=2 lockstep / ideal | p=4 | p=8 | bubble at m=8p, p=2 / 4 / 8 |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {grid[name, 2][0]:.3f} | {grid[name, 4][0]:.3f} | "
            f"{grid[name, 8][0]:.3f} | {grid[name, 2][1]:.3f} / {grid[name, 4][1]:.3f} / "
            f"{grid[name, 8][1]:.3f} |"
            for name, _ in bench_pipeline.SCHEDULES
        ],
        "",
        "A ratio below 1 is the executor beating the ideal figure of the schedule as written:",
        "it splits each whole backward into B then W (one unit each) wherever a whole B would",
        "stretch a tick, so the input gradient reaches the previous stage a unit earlier. GPipe",
        "is run as written (its ticks never mix F with B) and runs at exactly its ideal time.",
        "ZB-V's units are half a device's stage.",
        "",
        "What CPU timing can and cannot show: eight simulated devices share two cores, so the",
        "wall time of a pipelined step is the sum of every device's work, not the longest",
        "device's; idle ticks cost nothing and overlap cannot appear. A CPU run can measure",
        "the executor's own work against a hand-written pipeline (the PP row of the overhead",
        "table), temp memory and compile time (below), and the collectives in the program;",
        "the bubble, i.e. time, is what the lockstep figures above model and only an",
        "accelerator run can show.",
        "",
        "Memory and compile time: p = 4 devices, a stage of two 256-wide matmuls, 8 rows per",
        "microbatch. Temp memory is `compiled.memory_analysis().temp_size_in_bytes`; compile",
        "time is the best of 3 with the persistent cache off. Goal: 1F1B temp m=32 / m=4 <=",
        "1.3 while GPipe grows; compile m=32 / m=4 <= 1.3.",
        "",
        "| schedule | m | temp MiB | compile s | ideal time | lockstep time | bubble (ideal) | "
        "bubble (lockstep) | peak in flight |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per_m in pipe.items():
        for m, (temp, seconds, s) in sorted(per_m.items()):
            lines.append(
                f"| {name} | {m} | {temp / 2**20:.2f} | {seconds:.2f} | {s.total_time} | "
                f"{s.lockstep_time} | {s.bubble_fraction:.3f} | "
                f"{s.lockstep_bubble_fraction:.3f} | {max(s.peak_in_flight)} |"
            )
        t4, c4, _ = per_m[4]
        t32, c32, _ = per_m[32]
        lines.append(
            f"| **{name}: m=32 / m=4** | | **{t32 / t4:.2f}** | **{c32 / c4:.2f}** | | | | | |"
        )
    lines += [
        "",
        "![temp memory against microbatches](img/pipeline_memory.png)",
        "",
        "What grows with m under 1F1B is the input gradient `g_x`, returned whole.",
        "",
        "## Scaling model",
        "",
        "Per-device FLOPs of the MNIST step at a fixed global batch of 128 (XLA cost",
        "analysis of the compiled program), under `data_parallel` and `fully_sharded`",
        "(ZeRO-3). Data parallelism must divide the work exactly.",
        "",
        "| devices | DP FLOPs per device | DP ratio | ZeRO-3 FLOPs per device | ZeRO-3 ratio |",
        "|---|---|---|---|---|",
    ]
    base = scale[0][1]
    for n, dp_flops, fs_flops in scale:
        lines.append(
            f"| {n} | {dp_flops:,.0f} | {dp_flops / (base / n):.3f} | {fs_flops:,.0f} | "
            f"{fs_flops / (base / n):.3f} |"
        )
    lines += [
        "",
        "Ratio: FLOPs per device over the 1-device FLOPs divided by the devices. Under DP the",
        "remainder above 1.000 is the optimizer update, which every replica computes on the",
        "whole (replicated) state; under ZeRO-3 each device updates only its shards.",
        "",
        "## Checkpoints",
        "",
        f"A {ckpt['mib']:.0f} MiB state on `data=4 x model=2`, median of 7 alternating rounds",
        "against Orbax called directly. Goal: throughput ratio >= 0.9.",
        "",
        "| | Titanax MiB/s | Orbax MiB/s | ratio |",
        "|---|---|---|---|",
        f"| save | {ckpt['mib'] / ckpt['save']['titanax']:.0f} | "
        f"{ckpt['mib'] / ckpt['save']['orbax']:.0f} | "
        f"{ckpt['save']['orbax'] / ckpt['save']['titanax']:.2f} |",
        f"| restore | {ckpt['mib'] / ckpt['restore']['titanax']:.0f} | "
        f"{ckpt['mib'] / ckpt['restore']['orbax']:.0f} | "
        f"{ckpt['restore']['orbax'] / ckpt['restore']['titanax']:.2f} |",
        "",
        "Titanax adds to Orbax's save the checksums of the leaves, and to its restore a read",
        "of its JSON metadata, a check of the tree (about 1 ms) and the verification of the",
        "checksums (table below); beyond those, a gap in one run is the disk: the same call",
        "varies by tens of percent from round to round on this machine.",
        "",
        f"Asynchronous save: `save()` blocked the loop {ckpt['blocked_s']:.2f} s of the "
        f"{ckpt['total_s']:.2f} s the write took; {ckpt['steps']} training steps ran meanwhile "
        f"({(ckpt['total_s'] - ckpt['blocked_s']) / ckpt['total_s']:.0%} hidden).",
        "",
        "Every save computes a checksum of each leaf's global value on the devices, and every",
        "restore verifies them unless `verify=False` (same layout, median of 5 rounds):",
        "",
        "| state | save s | of which checksums s | restore s | restore, verify=False s |"
        " verification cost |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['mib']:.0f} MiB, `data=4 x model=2` | {r['save']:.3f} | {r['checksums']:.3f} | "
            f"{r['verified']:.3f} | {r['unverified']:.3f} | "
            f"{r['verified'] / r['unverified'] - 1:+.0%} |"
            for r in sums
        ],
        "",
        "## On an accelerator",
        "",
        (
            f"`make bench GPU=1`: {gpu}."
            if gpu
            else "`python tests/benchmarks/report.py --gpu` adds tokens/s and MFU of a larger GPT "
            "on the accelerators present. This report was written without one."
        ),
        "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
