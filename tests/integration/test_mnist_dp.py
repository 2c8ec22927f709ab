"""The promise: MNIST DP on 1 and 8 devices gives the same losses (< 1e-4 over a run)."""

import chex
import jax
import numpy as np
import optax
import pytest

import titanax as tx
from examples.mnist_dp import train as example


@pytest.fixture(scope="module")
def digits():
    return example.load_digits()


def test_50_steps_on_1_and_8_devices(digits):
    one = tx.mesh(devices=jax.devices()[:1], data=1)
    eight = tx.mesh(data=8)
    state1, losses1 = example.train(one, digits, steps=50)
    state8, losses8 = example.train(eight, digits, steps=50)

    # The plain single-device program, written without Titanax, is the reference.
    params = example.init_params(jax.random.key(0), (64, 128, 128, 10))
    ref = tx.TrainState.create(params, optax.adam(1e-3))
    ref_step = jax.jit(
        lambda s, b: (lambda lg: (s.apply_gradients(lg[1]), lg[0]))(
            jax.value_and_grad(example.loss_fn)(s.params, b)
        )
    )
    ref_losses = []
    it = tx.data.Loader((digits[0], digits[1]), 128, seed=0)
    for _ in range(50):
        ref, loss = ref_step(ref, next(it))
        ref_losses.append(float(loss))

    diff_1_8 = np.max(np.abs(np.array(losses1) - np.array(losses8)))
    diff_ref_8 = np.max(np.abs(np.array(ref_losses) - np.array(losses8)))
    print(
        f"max |loss diff| over 50 steps: 1 vs 8 devices {diff_1_8:.2e}, "
        f"reference vs 8 devices {diff_ref_8:.2e}"
    )
    assert diff_1_8 < 1e-4 and diff_ref_8 < 1e-4
    assert losses8[-1] < 0.5 * losses8[0]  # it learned
    chex.assert_trees_all_close(state1.params, state8.params, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(ref.params, state8.params, rtol=1e-4, atol=1e-5)


def test_one_step_gradients_match_to_1e6(digits):
    params = example.init_params(jax.random.key(0), (64, 128, 128, 10))
    batch = (digits[0][:128], digits[1][:128])
    ref = jax.grad(example.loss_fn)(params, batch)
    grads = tx.data_parallel(
        lambda p, b: tx.pmean(jax.grad(example.loss_fn)(p, b), "data"), mesh=tx.mesh(data=8)
    )(params, batch)
    chex.assert_trees_all_close(grads, ref, rtol=1e-6, atol=1e-7)


def test_example_main_runs_and_learns(capsys):
    acc = example.main(["--devices", "8", "--steps", "60"])
    out = capsys.readouterr().out
    assert "test accuracy" in out
    assert acc > 0.8


def test_real_mnist_loader_reads_idx_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(10,), dtype=np.uint8)

    def idx(arr, path):
        with open(path, "wb") as f:
            f.write(bytes([0, 0, 0x08, arr.ndim]))
            for d in arr.shape:
                f.write(int(d).to_bytes(4, "big"))
            f.write(arr.tobytes())

    for stem, arr in [
        ("train-images-idx3-ubyte", images),
        ("train-labels-idx1-ubyte", labels),
        ("t10k-images-idx3-ubyte", images[:4]),
        ("t10k-labels-idx1-ubyte", labels[:4]),
    ]:
        idx(arr, tmp_path / stem)
    xtr, ytr, xte, yte = example.load_mnist(str(tmp_path))
    assert xtr.shape == (10, 784) and xte.shape == (4, 784)
    np.testing.assert_allclose(xtr[3], images[3].reshape(-1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ytr, labels)

    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    np.savez(
        npz_dir / "mnist.npz", x_train=images, y_train=labels, x_test=images[:4], y_test=labels[:4]
    )
    xtr2, ytr2, _, _ = example.load_mnist(str(npz_dir))
    np.testing.assert_array_equal(xtr2, xtr)
    np.testing.assert_array_equal(ytr2, ytr)
