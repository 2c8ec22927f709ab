"""``assert_matches_reference``: a parallel step against its single-device reference."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from titanax._util import bullets, count, leaves_with_paths

if TYPE_CHECKING:
    pass


# --- comparing a parallel step with its reference --------------------------------------------


def assert_matches_reference(
    parallel_fn: Callable[..., Any],
    reference_fn: Callable[..., Any],
    /,
    *args: Any,
    steps: int = 1,
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> None:
    """Checks that ``parallel_fn`` computes what ``reference_fn`` computes.

    Both functions are called on copies of ``args``, so that neither sees
    values the other consumed: a :func:`~titanax.data_parallel` step donates
    its state by default. The reference gets its array arguments on one
    device. With ``steps > 1``, each function's first output (the first
    element when it returns a tuple) becomes its own first argument for the
    next step, the state of a training loop, and the other arguments are
    passed again unchanged. After every step, every output leaf is compared
    as ``numpy.testing.assert_allclose`` does: ``|parallel - reference| <=
    atol + rtol * |reference|``, with NaNs equal where both are NaN.

    ``reference_fn`` is called as given: wrap it in ``jax.jit`` for speed,
    or leave it plain to compare with op-by-op execution.

    Args:
      parallel_fn: the function under test, e.g. a :class:`~titanax.ParallelFunction`.
      reference_fn: the same computation on one device; it takes the same
        arguments and returns outputs with the same tree structure and shapes.
      *args: the arguments of both functions (batches are global batches).
      steps: how many steps to run, feeding the first output back as the
        first argument.
      rtol: relative tolerance.
      atol: absolute tolerance.

    Raises:
      AssertionError: the outputs differ at some step. The message names the
        step, how many output leaves are not close, and every such leaf, the
        worst first (by how far it is past the tolerance), with its path, its
        largest absolute and relative errors and the worst element; or the
        outputs have different structures or shapes.
      ValueError: ``steps`` is not a positive int, or ``steps > 1`` without
        any argument to feed the state into.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, titanax as tx
      >>> from titanax.testing import assert_matches_reference
      >>> mesh = tx.mesh(data=8)
      >>> def loss_fn(w, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> def reference(w, batch):
      ...     loss, grad = jax.value_and_grad(loss_fn)(w, batch)
      ...     return w - 0.1 * grad, loss
      >>> @tx.data_parallel(mesh=mesh)
      ... def sgd_step(w, batch):
      ...     loss, grad = jax.value_and_grad(loss_fn)(w, batch)
      ...     return w - 0.1 * tx.pmean(grad, "data"), tx.pmean(loss, "data")
      >>> rng = np.random.default_rng(0)
      >>> batch = (rng.normal(size=(16, 3)).astype(np.float32), np.ones(16, np.float32))
      >>> w = np.zeros(3, np.float32)
      >>> assert_matches_reference(sgd_step, jax.jit(reference), w, batch, steps=3)

      A step that sums the replicas' gradients instead of averaging them:

      >>> @tx.data_parallel(mesh=mesh)
      ... def too_big(w, batch):
      ...     loss, grad = jax.value_and_grad(loss_fn)(w, batch)
      ...     return w - 0.1 * tx.psum(grad, "data"), tx.pmean(loss, "data")
      >>> assert_matches_reference(too_big, jax.jit(reference), w, batch, steps=3)
      Traceback (most recent call last):
      ...
      AssertionError: parallel_fn 'too_big' does not match reference_fn 'reference' at step 1 of 3 (rtol=1e-06, atol=1e-06): 1 of 2 output leaves differs. Worst: output 0, max abs error 0.28, max rel error 7.
        * output 0  shape (3,): 3 of 3 elements differ; max abs error 0.28, max rel error 7; worst at index (2,): 0.32 vs reference 0.0399
    """
    __tracebackhide__ = True  # pytest: show the caller's line, not this function's
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"assert_matches_reference: steps must be a positive int, got {steps!r}.")
    if steps > 1 and not args:
        raise ValueError(
            "assert_matches_reference: steps > 1 feeds each function's first output back as its "
            "first argument, but no arguments were given."
        )
    names = (_name(parallel_fn, "parallel_fn"), _name(reference_fn, "reference_fn"))
    device = jax.local_devices()[0]
    state: tuple[Any, Any] = (None, None)
    for step in range(1, steps + 1):
        rest = args[1:] if step > 1 else args
        par_args = [_copy(a) for a in rest]
        ref_args = [_copy(a, device) for a in rest]
        if step > 1:
            par_args.insert(0, state[0])
            ref_args.insert(0, state[1])
        out = parallel_fn(*par_args)
        ref = reference_fn(*ref_args)
        problem = _compare(out, ref, rtol, atol)
        if problem:
            raise AssertionError(
                f"{names[0]} does not match {names[1]} at step {step} of {steps} "
                f"(rtol={rtol:g}, atol={atol:g}): {problem}"
            )
        state = (_first(out), _first(ref))


def _name(fn: Any, role: str) -> str:
    name = getattr(fn, "__name__", None)
    return f"{role} {name!r}" if isinstance(name, str) else role


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _copy(tree: Any, device: jax.Device | None = None) -> Any:
    """A copy of every array leaf of ``tree`` (moved to ``device`` if given); other leaves as they are."""

    def one(x: Any) -> Any:
        if _is_key(x):
            return jax.random.wrap_key_data(
                one(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        if isinstance(x, jax.Array) and device is None:
            return jnp.copy(x)
        if isinstance(x, jax.Array):
            # Through the host: jax.device_put(x, device) keeps the mesh of an Explicit-sharded
            # x in its type (jax 0.10.2), and eager ops on it then fail.
            return jax.device_put(np.array(x), device)
        if isinstance(x, np.ndarray):
            return x.copy()
        return x

    return jax.tree.map(one, tree)


def _host(x: Any) -> np.ndarray:
    """The leaf as a numpy array; a PRNG key array as an object array of its key data."""
    if not _is_key(x):
        return np.asarray(x)
    data = np.asarray(jax.random.key_data(x))
    keys = np.empty(x.shape, dtype=object)
    for i in np.ndindex(x.shape):
        keys[i] = tuple(data[i].tolist())
    return keys


def _parts(out: Any) -> tuple[Any, ...]:
    return out if isinstance(out, tuple) else (out,)


def _label(k: int, path: str) -> str:
    return f"output {k}" + (f" [{path}]" if path else "")


def _compare(out: Any, ref: Any, rtol: float, atol: float) -> str | None:
    """Why ``out`` is not close to ``ref`` (a message), or ``None`` when it is."""
    parts, ref_parts = _parts(out), _parts(ref)
    if len(parts) != len(ref_parts):
        return (
            f"the parallel function returns {count(len(parts), 'output')} and the reference "
            f"{len(ref_parts)}; return the same tree from both."
        )
    fails: list[tuple[float, str, str, str]] = []  # (how far past the tolerance, label, ...)
    total = 0
    for k, (part, ref_part) in enumerate(zip(parts, ref_parts)):
        leaves, ref_leaves = dict(leaves_with_paths(part)), dict(leaves_with_paths(ref_part))
        if list(leaves) != list(ref_leaves):
            only = [_label(k, p) for p in leaves if p not in ref_leaves]
            ref_only = [_label(k, p) for p in ref_leaves if p not in leaves]
            return "the outputs have different tree structures:\n" + bullets(
                [f"{x}  only in the parallel output" for x in only]
                + [f"{x}  only in the reference output" for x in ref_only]
                or [f"output {k}: the same leaves in another order"]
            )
        for path, leaf in leaves.items():
            total += 1
            found = _leaf_problem(_host(leaf), _host(ref_leaves[path]), rtol, atol)
            if found:
                fails.append((found[0], _label(k, path), *found[1:]))
    if not fails:
        return None
    fails.sort(key=lambda f: -f[0])
    _, label, summary, _ = fails[0]
    verb = "differs" if len(fails) == 1 else "differ"
    return (
        f"{len(fails)} of {count(total, 'output leaf', 'output leaves')} {verb}. "
        f"Worst: {label}, {summary}.\n"
        + bullets([f"{label}  {details}" for _, label, _, details in fails])
    )


def _leaf_problem(
    a: np.ndarray, b: np.ndarray, rtol: float, atol: float
) -> tuple[float, str, str] | None:
    """``(how far past the tolerance, summary, details)`` for leaves that are not close."""
    if a.shape != b.shape:
        what = f"shape {a.shape}, but the reference has shape {b.shape}"
        return math.inf, what, what
    where = f"shape {a.shape}: "
    numeric = a.dtype.kind in "biufc" and b.dtype.kind in "biufc"
    if not numeric:
        if np.array_equal(a, b):
            return None
        n_bad = int(np.count_nonzero(a != b)) if a.dtype == b.dtype else a.size
        keys = a.dtype == b.dtype == object
        kind = "PRNG keys" if keys else f"{a.dtype} vs reference {b.dtype}"
        what = f"{_elements(n_bad, a.size)} (compared exactly: {kind})"
        return math.inf, what, where + what
    if a.size == 0:
        return None
    wide = np.complex128 if "c" in (a.dtype.kind, b.dtype.kind) else np.float64
    x, y = a.astype(wide), b.astype(wide)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        same = (x == y) | (np.isnan(x) & np.isnan(y))  # equal infinities, or NaN in both
        finite = np.isfinite(x) & np.isfinite(y)
        diff = np.where(same, 0.0, np.where(finite, np.abs(x - y), np.inf))
        tol = atol + rtol * np.where(finite, np.abs(y), 0.0)
        bad = ~same & (~finite | (diff > tol))
        if not bad.any():
            return None
        past = np.where(bad, diff / tol, 0.0)  # inf for a zero tolerance or a non-finite value
        rel = np.where(diff == 0, 0.0, diff / np.abs(y))  # inf where the reference is 0
    i = np.unravel_index(int(np.argmax(past)), past.shape)
    at = f"index {tuple(int(j) for j in i)}: " if a.ndim else "value "
    summary = f"max abs error {float(diff.max()):.3g}, max rel error {float(rel.max()):.3g}"
    details = (
        f"{_elements(int(np.count_nonzero(bad)), a.size)}; {summary}; "
        f"worst at {at}{_num(a[i])} vs reference {_num(b[i])}"
    )
    return float(past.max()), summary, where + details


def _elements(bad: int, size: int) -> str:
    return f"{bad} of {count(size, 'element')} {'differs' if bad == 1 else 'differ'}"


def _num(v: Any) -> str:
    return f"{v.item():.3g}" if isinstance(v, np.generic) else f"{v:.3g}"
