"""Checkpoint throughput against plain Orbax, and how much of an async save training hides.

Printed, not asserted. Goal: Titanax / Orbax throughput >= 0.9 for save and restore.
"""

import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import titanax as tx

MB = 2**20


def make_state(mesh, n=1024):
    """About 200 MB (n=1024): kernels sharded over 'model', the rest replicated."""
    tree = {
        f"layer{i}": {"kernel": jnp.full((n, 6 * n), float(i)), "bias": jnp.zeros(6 * n)}
        for i in range(8)
    }
    specs = tx.Rules((r"kernel$", P(None, "model")), (r".*", P())).specs(tree, mesh)
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P)
    )
    return jax.block_until_ready(jax.device_put(tree, shardings))


def titanax_round(state, directory):
    with tx.checkpoint.Manager(directory, async_save=False) as mngr:
        t0 = time.perf_counter()
        mngr.save(1, state)
        t1 = time.perf_counter()
        jax.block_until_ready(mngr.restore(1, like=state))
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def orbax_round(state, directory):
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory, options=options) as mngr:
        t0 = time.perf_counter()
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        t1 = time.perf_counter()
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
        )
        jax.block_until_ready(
            mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        )
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def measure():
    """Save/restore throughput against plain Orbax, and the async save's hidden share."""
    mesh = tx.mesh(data=4, model=2)
    state = make_state(mesh)
    size = sum(a.nbytes for a in jax.tree.leaves(state)) / MB
    results = {"titanax": [], "orbax": []}
    pair = [("titanax", titanax_round), ("orbax", orbax_round)]
    for r in range(7):  # alternating rounds, alternating order: the disk and the page cache vary
        for name, fn in pair if r % 2 == 0 else pair[::-1]:
            d = tempfile.mkdtemp()
            results[name].append(fn(state, d))
            shutil.rmtree(d)
    save = {k: statistics.median(s for s, _ in v) for k, v in results.items()}
    load = {k: statistics.median(r for _, r in v) for k, v in results.items()}
    print(f"\nstate {size:.0f} MiB on mesh data=4 x model=2 (median of 7 alternating rounds)")
    for k in results:
        print(f"  {k:8s} save {size / save[k]:7.1f} MiB/s   restore {size / load[k]:7.1f} MiB/s")
    print(
        f"  throughput Titanax / Orbax: save {save['orbax'] / save['titanax']:.2f}, "
        f"restore {load['orbax'] / load['titanax']:.2f}"
    )

    # Async: how long save() blocks, against the whole write, with training steps in between.
    step = tx.data_parallel(
        lambda w, x: (w + tx.pmean(jnp.tanh(x @ w).sum(), "data"), tx.pmean(x.sum(), "data")),
        mesh=mesh,
    )
    w, x = jnp.ones((512, 512)), jnp.ones((64, 512))
    w, _ = step(w, x)
    d = tempfile.mkdtemp()
    with tx.checkpoint.Manager(d, async_save=True) as mngr:
        t0 = time.perf_counter()
        mngr.save(1, state)
        blocked = time.perf_counter() - t0
        steps = 0
        while mngr.is_saving():
            w, _ = jax.block_until_ready(step(w, x))
            steps += 1
        total = time.perf_counter() - t0
    shutil.rmtree(d)
    print(
        f"  async save: save() blocked {blocked:.2f} s of {total:.2f} s; {steps} training "
        f"steps ran meanwhile; hidden share {(total - blocked) / total:.0%}"
    )
    return {
        "mib": size,
        "save": save,
        "restore": load,
        "blocked_s": blocked,
        "total_s": total,
        "steps": steps,
    }


def test_throughput_and_async_share():
    measure()


def _clock(t0):
    return time.perf_counter() - t0


def measure_checksums(sizes=(128, 1024), rounds=5):
    """What the per-leaf checksums cost: computing them (part of every save), and a restore
    that verifies them against one that does not (``verify=False``), on ``data=4 x model=2``.

    Returns one dict per state size: MiB, median seconds of a synchronous save, of the
    checksums alone, of a verified restore and of an unverified one.
    """
    from titanax.checkpoint.checksum import checksums

    mesh = tx.mesh(data=4, model=2)
    rows = []
    for n in sizes:
        state = make_state(mesh, n)
        leaves = jax.tree.leaves(state)
        size = sum(a.nbytes for a in leaves) / MB
        times = {"save": [], "checksums": [], "verified": [], "unverified": []}
        d = tempfile.mkdtemp()
        with tx.checkpoint.Manager(d, max_to_keep=2, async_save=False) as mngr:
            mngr.save(0, state)  # compiles the checksums of this layout
            for r in range(1, rounds + 1):
                t0 = time.perf_counter()
                mngr.save(r, state)
                times["save"].append(_clock(t0))
                t0 = time.perf_counter()
                checksums(leaves)
                times["checksums"].append(_clock(t0))
                pair = [(True, "verified"), (False, "unverified")]
                for verify, name in pair if r % 2 else pair[::-1]:
                    t0 = time.perf_counter()
                    jax.block_until_ready(mngr.restore(r, like=state, verify=verify))
                    times[name].append(_clock(t0))
        shutil.rmtree(d)
        row = {"mib": size, **{k: statistics.median(v) for k, v in times.items()}}
        rows.append(row)
        print(
            f"\nstate {size:.1f} MiB on data=4 x model=2, median of {rounds}: save "
            f"{row['save']:.3f} s (checksums {row['checksums']:.3f} s); restore "
            f"{row['verified']:.3f} s verified, {row['unverified']:.3f} s with verify=False "
            f"(+{row['verified'] / row['unverified'] - 1:.0%})"
        )
    return rows


def test_checksum_cost():
    measure_checksums()
