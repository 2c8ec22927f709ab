"""Pipeline schedules: compiled temp memory and compile time against microbatches (p=4).

Printed, not asserted. Goal: 1F1B temp bytes flat in m (m=32 / m=4 <= 1.3) while GPipe
grows; compile time m=32 / m=4 <= 1.3 for every schedule.
"""

import time

import jax
import jax.numpy as jnp

import titanax as tx

D, ROWS = 256, 8


SCHEDULES = [
    ("gpipe", 1),
    ("1f1b", 1),
    ("interleaved_1f1b", 2),
    ("zero_bubble", 1),
    ("zero_bubble_v", 2),
]


def stage(p, x):
    return x + jnp.tanh(jnp.tanh(x @ p["w"]) @ p["w2"])


def loss(_, y, t):
    return jnp.mean((y - t) ** 2)


def measure(name, m, v=1, p=4):
    mesh = tx.mesh(devices=jax.devices()[:p], stage=p)
    sp = {"w": jnp.full((p * v, D, D), 0.01), "w2": jnp.full((p * v, D, D), 0.01)}
    x, t = jnp.ones((m * ROWS, D)), jnp.zeros((m * ROWS, D))
    pipe = tx.pipeline(stage, schedule=name, microbatches=m, loss=loss, mesh=mesh, virtual_stages=v)
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        times = []
        with jax.set_mesh(mesh):
            for _ in range(3):  # best of 3: the machine is noisy
                jax.clear_caches()
                t0 = time.perf_counter()
                compiled = jax.jit(pipe).lower(sp, x, t).compile()
                times.append(time.perf_counter() - t0)
        seconds = min(times)
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    s = tx.schedules.get(name, stages=p, microbatches=m, virtual_stages=v)
    return compiled.memory_analysis().temp_size_in_bytes, seconds, s


def table():
    """``{schedule: {m: (temp bytes, compile s, Schedule)}}`` for p=4, m in 4, 8, 16, 32."""
    return {name: {m: measure(name, m, v) for m in (4, 8, 16, 32)} for name, v in SCHEDULES}


def lockstep_grid():
    """``{(schedule, p): (worst lockstep / ideal over m = p .. 8p, ZB bubble at m = 8p)}``:
    the time of the program the executor runs against the schedule's ideal time."""
    out = {}
    for name, v in SCHEDULES:
        for p in (2, 4, 8):
            ms = [m for m in range(p, 8 * p + 1) if name != "interleaved_1f1b" or m % p == 0]
            runs = [tx.schedules.get(name, stages=p, microbatches=m, virtual_stages=v) for m in ms]
            worst = max(s.lockstep_time / s.total_time for s in runs)
            out[name, p] = (worst, runs[-1].lockstep_bubble_fraction)
    return out


def test_memory_and_compile_time_against_microbatches():
    rows = []
    for name, v in SCHEDULES:
        results = {m: measure(name, m, v) for m in (4, 8, 16, 32)}
        for m, (temp, seconds, s) in results.items():
            rows.append(
                f"| {name} | {m} | {temp / 2**20:.2f} | {seconds:.2f} | "
                f"{s.bubble_fraction:.3f} | {s.lockstep_bubble_fraction:.3f} | "
                f"{max(s.peak_in_flight)} |"
            )
        t4, c4, _ = results[4]
        t32, c32, _ = results[32]
        rows.append(f"| {name}: m=32 / m=4 | | {t32 / t4:.2f} | {c32 / c4:.2f} | | | |")
    print(
        "\n| schedule | m | temp MiB | compile s | bubble (ideal) | bubble (lockstep) | "
        "peak in flight |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
