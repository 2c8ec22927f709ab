"""Handwritten digits with data parallelism: an MLP trained by ``tx.data_parallel``.

By default it trains on the 8x8 digits that ship with scikit-learn (no download);
``data_dir`` reads the real MNIST files (``mnist.npz`` or the four IDX files,
gzipped or not). Settings come from ``config.yaml``, overridden on the command line:

    python examples/mnist_dp/train.py --set steps=300 --devices 8
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import sys
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))

from examples.common import Checkpoints, command, run, say, start  # noqa: E402


# ---------------------------------------------------------------- data
def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits, scaled to [0, 1], split 1,500 / 297."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path} is not an IDX file of unsigned bytes")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def load_mnist(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The real MNIST from ``data_dir``: ``mnist.npz`` or the four IDX files."""
    npz = os.path.join(data_dir, "mnist.npz")
    if os.path.exists(npz):
        with np.load(npz, allow_pickle=False) as f:
            parts = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    else:

        def find(stem: str) -> str:
            for name in (
                stem,
                stem + ".gz",
                stem.replace("-idx", ".idx"),
                stem.replace("-idx", ".idx") + ".gz",
            ):
                if os.path.exists(p := os.path.join(data_dir, name)):
                    return p
            raise FileNotFoundError(f"no {stem}[.gz] or mnist.npz in {data_dir}")

        parts = tuple(
            _read_idx(find(s))
            for s in (
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            )
        )
    xtr, ytr, xte, yte = parts
    flat = lambda x: (x.reshape(len(x), -1) / 255.0).astype(np.float32)  # noqa: E731
    return flat(xtr), ytr.astype(np.int32), flat(xte), yte.astype(np.int32)


# ---------------------------------------------------------------- model
def init_params(key: Any, sizes: tuple[int, ...]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(sub, (n_in, n_out), jnp.float32) * np.sqrt(2.0 / n_in),
            "bias": jnp.zeros((n_out,), jnp.float32),
        }
    return params


def apply(params: dict[str, Any], x: Any) -> Any:
    import jax

    layers = [params[k] for k in sorted(params)]
    for layer in layers[:-1]:
        x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
    return x @ layers[-1]["kernel"] + layers[-1]["bias"]


def loss_fn(params: dict[str, Any], batch: tuple[Any, Any]) -> Any:
    import optax

    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()


def train_step(state: Any, batch: tuple[Any, Any]) -> tuple[Any, dict[str, Any]]:
    """One step of one replica: local gradients, then the explicit DP reduction."""
    import jax

    import titanax as tx

    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    grads = tx.pmean(grads, "data")
    return state.apply_gradients(grads), {"loss": tx.pmean(loss, "data")}


def eval_step(params: dict[str, Any], batch: tuple[Any, Any, Any]) -> Any:
    """Correct predictions in the batch, summed over replicas (``mask`` drops padding)."""
    import jax.numpy as jnp

    import titanax as tx

    x, y, mask = batch
    correct = (jnp.argmax(apply(params, x), -1) == y) * mask
    return tx.psum(correct.sum(), "data")


def accuracy(evaluate: Any, params: Any, x: np.ndarray, y: np.ndarray, multiple: int) -> float:
    """Test accuracy: the set padded to a multiple of the replicas; each process passes its rows."""
    import jax

    pad = (-len(x)) % multiple
    mask = np.concatenate([np.ones(len(x), np.float32), np.zeros(pad, np.float32)])
    xp = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)])
    yp = np.concatenate([y, np.zeros(pad, y.dtype)])
    rows = len(xp) // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    return float(evaluate(params, (xp[mine], yp[mine], mask[mine]))) / len(x)


def train(
    mesh: Any,
    data: tuple[np.ndarray, ...],
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    hidden: int = 128,
    seed: int = 0,
    progress: bool = False,
    checkpoint_dir: str | None = None,
    save_every: int = 0,
    metrics_path: str | None = None,
) -> tuple[Any, list[float]]:
    """Trains on ``mesh`` to ``steps`` and returns the final state and the loss of each step run.

    With ``checkpoint_dir``, it saves there every ``save_every`` steps and at the
    end, and resumes from the newest checkpoint it finds (state and data position).
    """
    import jax
    import optax

    import titanax as tx

    xtr, ytr = data[0], data[1]
    params = init_params(jax.random.key(seed), (xtr.shape[1], hidden, hidden, 10))
    step = tx.data_parallel(train_step, axis="data", mesh=mesh)
    loader = tx.data.Loader((xtr, ytr), batch_size, seed=seed)
    state = tx.TrainState.create(params, optax.adam(lr))
    local = batch_size // jax.process_count()  # each process passes its own rows
    state = step.place(state, (xtr[:local], ytr[:local]))[0]  # laid out once
    ckpt = Checkpoints(checkpoint_dir, save_every, loader.state)
    state, start, position = ckpt.resume(state)
    if position is not None:
        loader = tx.data.Loader((xtr, ytr), batch_size, seed=seed, position=position)
    return run(
        step,
        state,
        lambda _: next(loader),
        steps,
        start=start,
        desc="train" if progress else None,
        checkpoints=ckpt,
        metrics_path=metrics_path,
        examples_per_step=batch_size,
    )


@dataclasses.dataclass
class Config:
    """The example's settings; ``config.yaml`` beside this file holds the defaults."""

    devices: int = 8
    """Simulated CPU devices (under `titanax launch`: all processes' devices)."""
    steps: int = 300
    """Training steps."""
    batch_size: int = 128
    """Global batch, split over the `data` axis."""
    lr: float = 1e-3
    """Adam's learning rate."""
    hidden: int = 128
    """Width of the MLP's two hidden layers."""
    seed: int = 0
    """Seed of the initial parameters and the shuffling."""
    data_dir: str | None = None
    """A directory with the real MNIST (mnist.npz or the IDX files); null: scikit-learn's digits."""
    checkpoint_dir: str | None = None
    """Save checkpoints here; resume from the newest one found."""
    save_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    metrics: str | None = None
    """Append one JSON line per step (loss, throughput) to this file."""


CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml")


def build(cfg: Config) -> tuple[Any, tuple[Any, ...]]:
    """The training step and example arguments, for ``titanax explain`` (nothing trains)."""
    import jax
    import optax

    import titanax as tx

    mesh = tx.mesh(devices=jax.devices()[: cfg.devices], data=-1)
    x, y = load_digits()[:2]
    params = init_params(jax.random.key(cfg.seed), (x.shape[1], cfg.hidden, cfg.hidden, 10))
    state = tx.TrainState.create(params, optax.adam(cfg.lr))
    step = tx.data_parallel(train_step, axis="data", mesh=mesh)
    return step, (state, (x[: cfg.batch_size], y[: cfg.batch_size]))


def main(argv: list[str] | None = None) -> float:
    """``train.py [--config FILE] [--set key=value ...] [--key value ...]``."""
    from titanax.launch.config import from_argv

    cfg = from_argv(Config, argv, default=CONFIG, description=__doc__, exit_on_error=True)
    import jax

    start(cfg.devices)  # devices, and the other processes under `titanax launch`
    if len(jax.devices()) < cfg.devices:
        raise SystemExit(f"devices={cfg.devices}: only {len(jax.devices())} devices available")
    import titanax as tx

    data = load_mnist(cfg.data_dir) if cfg.data_dir else load_digits()
    mesh = tx.mesh(devices=jax.devices()[: cfg.devices], data=-1)
    say(f"{len(data[0])} training / {len(data[2])} test examples; mesh {dict(mesh.shape)}")
    state, losses = train(
        mesh,
        data,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        hidden=cfg.hidden,
        seed=cfg.seed,
        progress=True,
        checkpoint_dir=cfg.checkpoint_dir,
        save_every=cfg.save_every,
        metrics_path=cfg.metrics,
    )
    evaluate = tx.data_parallel(eval_step, axis="data", mesh=mesh, donate=False)
    acc = accuracy(evaluate, state.params, data[2], data[3], mesh.shape["data"])
    say(f"final loss {losses[-1] if losses else float('nan'):.4f}; test accuracy {acc:.4f}")
    return acc


if __name__ == "__main__":
    command(main)
