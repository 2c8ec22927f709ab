"""Hugging Face Llama checkpoints (``config.json`` + safetensors) in and out of this example.

`read_config` reads ``config.json`` (``LlamaForCausalLM``, ``MistralForCausalLM``) and refuses
what `model.py` does not implement. `load_params` maps Hugging Face's tensor names onto the
example's stacked tree; with ``shardings``, every device reads only its own shard from the
files (``titanax.checkpoint.safetensors``), so the model never sits whole on one device or
host. `save_params` writes the same layout back; load -> save gives the original tensors
bit for bit.

The mapping, per layer ``i`` (``weight`` is PyTorch's ``(d_out, d_in)``, a kernel is
``(d_in, d_out)``, stacked on a leading layer dimension)::

    model.embed_tokens.weight                    -> model/embed_tokens/embedding   as is
    model.layers.{i}.self_attn.q_proj.weight     -> model/layers/self_attn/q_proj/kernel[i]
                                                    rows un-permuted per head (RoPE), transposed
    model.layers.{i}.self_attn.k_proj.weight     -> .../k_proj/kernel[i]   same, KV heads
    model.layers.{i}.self_attn.{v,o}_proj.weight -> .../{v,o}_proj/kernel[i]   transposed
    model.layers.{i}.mlp.{gate,up,down}_proj.weight -> model/layers/mlp/.../kernel[i]   transposed
    model.layers.{i}.{input,post_attention}_layernorm.weight -> model/layers/.../weight[i]
    model.norm.weight                            -> model/norm/weight
    lm_head.weight                               -> lm_head/kernel   transposed (absent when tied)

RoPE: Hugging Face rotates dimensions ``i`` and ``i + hd/2`` of a head together
("rotate_half"); this model rotates ``(2i, 2i+1)`` (Meta's layout). Hugging Face's converter
permuted the q/k rows from Meta's order to its own (``convert_llama_weights_to_hf.permute``);
`load_params` applies the inverse, `save_params` the permutation again.

Loading onto a mesh with the Megatron rule set (the lazy tree's leaves have shapes, so
rules lay it out before anything is read)::

    cfg = hf.read_config(path)
    rules = tx.rules.llama(stacked=True, num_key_value_heads=cfg.kv_heads,
                           axis_size=mesh.shape["model"])
    specs = rules.specs(hf.lazy_params(st.Reader(path), cfg), mesh)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, P))
    params = hf.load_params(path, cfg, shardings, dtype=jnp.float32)  # float32 master weights
    ...
    hf.save_params(params, cfg, out_dir, max_shard_bytes=5 * 2**30, dtype=jnp.bfloat16)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np

from examples.llama.model import LlamaConfig, Params
from titanax._util import bullets
from titanax.checkpoint import safetensors as st
from titanax.errors import CheckpointError, ConfigError

# transformers' defaults, which config.json may leave out (save_pretrained writes only the
# values that differ from them): rms_norm_eps is 1e-6 there, not LlamaConfig's 1e-5.
_LLAMA = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": {
        **_LLAMA,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "sliding_window": 4096,
    },
}
ARCHITECTURES = tuple(DEFAULTS)
CONFIG, INDEX = "config.json", "model.safetensors.index.json"
# Tensors a checkpoint may hold that carry nothing for this model: RoPE's inverse
# frequencies (older conversions saved the buffer), recomputed from rope_theta.
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
# Set to False only to show that the logits test fails without the inverse permutation.
_UNDO_ROPE_PERMUTATION = True

# (our path under model/layers, Hugging Face's name under model.layers.{i}, kind), in
# PyTorch's state_dict order. Kinds: "q"/"k" (rows permuted per head, then transposed),
# "linear" (transposed), "vector" (as is).
LAYER = (
    (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", "q"),
    (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", "k"),
    (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", "linear"),
    (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", "linear"),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", "linear"),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", "linear"),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", "linear"),
    (("input_layernorm", "weight"), "input_layernorm.weight", "vector"),
    (("post_attention_layernorm", "weight"), "post_attention_layernorm.weight", "vector"),
)


def read_config(directory: str | os.PathLike[str]) -> LlamaConfig:
    """The `LlamaConfig` of a Hugging Face checkpoint directory, from its ``config.json``.

    Raises:
      ConfigError: no ``config.json``, another architecture, or a feature this model does
        not implement (``rope_scaling``, biases, a sliding window, an activation other than
        SiLU, attention dropout); the message names the field and the file.
    """
    path = os.path.join(os.fspath(directory), CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found; a Hugging Face checkpoint directory has one")
    with open(path) as f:
        config = json.load(f)
    arch = [a for a in config.get("architectures") or [] if a in DEFAULTS]
    if not arch:
        raise ConfigError(
            f"{path}: architectures={config.get('architectures')!r}; this example implements"
            f" {' and '.join(ARCHITECTURES)}"
        )
    config = {**DEFAULTS[arch[0]], **config}
    rope = config.get("rope_parameters")  # transformers >= 5 keeps rope_theta in here
    if isinstance(rope, dict):
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(
                f"{path}: rope_parameters.rope_type={rope['rope_type']!r} is not implemented"
                " (plain RoPE only, rope_type 'default')"
            )
        config = {**config, "rope_theta": rope.get("rope_theta", config.get("rope_theta"))}
    scaling = config.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) != "default":
        raise ConfigError(
            f"{path}: rope_scaling={scaling!r} is not implemented (plain RoPE only):"
            " use a checkpoint without rope_scaling"
        )
    refused = [
        ("attention_bias", bool(config.get("attention_bias")), "this Llama has no biases"),
        ("mlp_bias", bool(config.get("mlp_bias")), "this Llama has no biases"),
        ("hidden_act", config.get("hidden_act", "silu") != "silu", "only 'silu' is implemented"),
        ("attention_dropout", bool(config.get("attention_dropout")), "no dropout is implemented"),
        (
            "sliding_window",
            config.get("sliding_window") is not None
            and config["sliding_window"] < config["max_position_embeddings"],
            "attention is over the whole causal context (a window no shorter than"
            " max_position_embeddings, or null, is fine)",
        ),
    ]
    for field, bad, why in refused:
        if bad:
            raise ConfigError(f"{path}: {field}={config[field]!r} is not implemented: {why}")
    try:
        return LlamaConfig.from_hf({k: v for k, v in config.items() if k != "rope_scaling"})
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None


def rope_permutation(heads: int, head_dim: int) -> np.ndarray:
    """Row ``m`` of this model's (Meta-order) projection is Hugging Face's row ``perm[m]``.

    Per head, Meta's dimension ``2i + a`` (``a`` in 0, 1) is Hugging Face's ``a * hd/2 + i``:
    the inverse of ``convert_llama_weights_to_hf.permute``.
    """
    rows = np.arange(heads * head_dim).reshape(heads, 2, head_dim // 2)
    return rows.transpose(0, 2, 1).reshape(-1)


def _layer_name(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def _expected(cfg: LlamaConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every Hugging Face tensor the model needs: name -> (shape, how the shape is made)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.hd, cfg.kv_heads * cfg.hd
    qs, kvs = "num_attention_heads x head_dim", "num_key_value_heads x head_dim"
    per_layer: dict[str, tuple[tuple[int, ...], str]] = {
        "self_attn.q_proj.weight": ((q, d), f"({qs}, hidden_size)"),
        "self_attn.k_proj.weight": ((kv, d), f"({kvs}, hidden_size)"),
        "self_attn.v_proj.weight": ((kv, d), f"({kvs}, hidden_size)"),
        "self_attn.o_proj.weight": ((d, q), f"(hidden_size, {qs})"),
        "mlp.gate_proj.weight": ((f, d), "(intermediate_size, hidden_size)"),
        "mlp.up_proj.weight": ((f, d), "(intermediate_size, hidden_size)"),
        "mlp.down_proj.weight": ((d, f), "(hidden_size, intermediate_size)"),
        "input_layernorm.weight": ((d,), "(hidden_size,)"),
        "post_attention_layernorm.weight": ((d,), "(hidden_size,)"),
    }
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "model.embed_tokens.weight": ((v, d), "(vocab_size, hidden_size)")
    }
    for i in range(cfg.num_hidden_layers):
        out.update({_layer_name(i, k): s for k, s in per_layer.items()})
    out["model.norm.weight"] = ((d,), "(hidden_size,)")
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ((v, d), "(vocab_size, hidden_size)")
    return out


def _check(reader: st.Reader, cfg: LlamaConfig) -> None:
    expected = _expected(cfg)
    present = set(reader.names)
    problems = []
    for name, (shape, how) in expected.items():
        if name not in present:
            problems.append(f"missing: {name} {shape} = {how}")
        elif reader.shape(name) != shape:
            problems.append(
                f"wrong shape: {name} in {os.path.basename(reader.file(name))} is"
                f" {reader.shape(name)}, the config gives {shape} = {how}"
            )
    for name in sorted(present - set(expected)):
        if IGNORED.match(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue  # a tied checkpoint may still store its copy of the embedding
        problems.append(f"unexpected: {name} in {os.path.basename(reader.file(name))}")
    if problems:
        hint = ""
        if "missing: lm_head.weight" in " ".join(problems):
            hint = " A checkpoint without lm_head.weight has tie_word_embeddings=true."
        raise CheckpointError(
            f"load_params({reader.path!r}): {len(problems)} tensors do not fit the config"
            f" ({cfg.num_hidden_layers} layers, hidden_size={cfg.hidden_size},"
            f" num_attention_heads={cfg.num_attention_heads},"
            f" num_key_value_heads={cfg.kv_heads}, head_dim={cfg.hd}):\n{bullets(problems)}\n"
            f"Load with the config.json saved with these weights (read_config).{hint}"
        )


def lazy_params(reader: st.Reader, cfg: LlamaConfig) -> Params:
    """The parameter tree as `LazyTensor`s (nothing read yet), after checking every name
    and shape. `load_params` reads it; useful alone to read a few leaves."""
    _check(reader, cfg)
    perm = {
        "q": rope_permutation(cfg.num_attention_heads, cfg.hd),
        "k": rope_permutation(cfg.kv_heads, cfg.hd),
    }
    layers: Params = {}
    for path, name, kind in LAYER:
        parts = [reader.tensor(_layer_name(i, name)) for i in range(cfg.num_hidden_layers)]
        if kind in perm and _UNDO_ROPE_PERMUTATION:
            parts = [p.take(perm[kind], axis=0) for p in parts]
        leaf = st.stack(parts)
        _put(layers, path, leaf if kind == "vector" else leaf.transpose(0, 2, 1))
    params: Params = {
        "model": {
            "embed_tokens": {"embedding": reader.tensor("model.embed_tokens.weight")},
            "layers": layers,
            "norm": {"weight": reader.tensor("model.norm.weight")},
        }
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": reader.tensor("lm_head.weight").T}
    return params


def _put(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_params(
    directory: str | os.PathLike[str] | st.Reader,
    cfg: LlamaConfig,
    shardings: Any = None,
    *,
    dtype: Any = None,
) -> Params:
    """The parameters of a Hugging Face Llama checkpoint, laid out as ``shardings`` says.

    Args:
      directory: the checkpoint: ``model.safetensors``, or ``model-0000k-of-0000n.safetensors``
        with ``model.safetensors.index.json`` (or an open
        ``titanax.checkpoint.safetensors.Reader``).
      cfg: its config (`read_config`).
      shardings: a tree like the parameters of ``jax.sharding.Sharding``s, or one sharding
        for every leaf; ``None``: everything on this process's first device. Each device
        reads only its own shard from the files: nothing is read whole unless a sharding
        asks for it.
      dtype: convert to this dtype (e.g. ``jnp.float32`` master weights from a bf16 file);
        ``None`` keeps the file's.

    Returns:
      The parameter tree of ``examples/llama/model.py``, as committed ``jax.Array``s.

    Raises:
      CheckpointError: tensors missing, unexpected or of the wrong shape (all listed, each
        with its file), or ``shardings`` not shaped like the parameters.
    """
    reader = directory if isinstance(directory, st.Reader) else st.Reader(directory)
    lazy = lazy_params(reader, cfg)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, lazy, is_leaf=_is_lazy)
    ours = jax.tree.structure(lazy, is_leaf=_is_lazy)
    theirs = jax.tree.structure(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    if ours != theirs:  # type: ignore[operator]
        raise CheckpointError(
            f"load_params: shardings must be shaped like the parameters (or one sharding);"
            f"\n  parameters: {ours}\n  shardings:  {theirs}"
        )
    return jax.tree.map(
        lambda t, s: st.to_array(t, s, dtype=dtype), lazy, shardings, is_leaf=_is_lazy
    )


def _is_lazy(x: Any) -> bool:
    return isinstance(x, st.LazyTensor)


def save_params(
    params: Params,
    cfg: LlamaConfig,
    directory: str | os.PathLike[str],
    *,
    max_shard_bytes: int | None = None,
    dtype: Any = None,
) -> list[str]:
    """Writes ``params`` as a Hugging Face checkpoint: ``config.json`` and safetensors.

    The inverse of `load_params`: loading what this writes gives ``params`` bit for bit, and
    saving what `load_params` read writes the original tensors bit for bit. Leaves are
    copied to the host one at a time (each distinct shard once, from the device that holds
    it), and the tensors are written a leaf's layers after each other: host memory holds one
    leaf and one file's tensors at a time. Only process 0 writes.

    Args:
      params: the parameter tree (``jax.Array``s, sharded or not, or numpy arrays).
      cfg: the config written to ``config.json`` (``cfg.to_hf()``, with ``torch_dtype``).
      directory: created if needed; ``model*.safetensors*`` files in it are replaced.
      max_shard_bytes: above this many bytes, write ``model-0000k-of-0000n.safetensors``
        files of at most this size (a tensor larger than it gets a file of its own) and
        ``model.safetensors.index.json``; ``None``: one ``model.safetensors``.
      dtype: convert to this dtype (``None``: each leaf's own).

    Returns:
      The paths written (none on processes other than 0).

    Raises:
      CheckpointError: leaves missing or of the wrong shape for ``cfg`` (all listed), or a
        leaf that this process cannot see whole (several hosts; see the note in the code).
    """
    from safetensors.numpy import save_file

    expected = param_shapes(cfg)
    flat = {path: leaf for path, leaf in _flatten(params)}
    problems = [f"missing: {p} {s}" for p, s in expected.items() if p not in flat]
    problems += [
        f"wrong shape: {p} is {tuple(np.shape(flat[p]))}, the config gives {s}"
        for p, s in expected.items()
        if p in flat and tuple(np.shape(flat[p])) != s
    ]
    problems += [f"unexpected: {p}" for p in flat if p not in expected]
    if problems:
        raise CheckpointError(
            f"save_params: {len(problems)} leaves do not fit the config:\n{bullets(problems)}\n"
            "Save the parameters with the config they were built with."
        )
    # Several hosts: a leaf sharded across processes is not whole on any one of them. Saving
    # it needs every process to take part (multihost_utils.process_allgather of each
    # tensor, process 0 writing), or each process writing the tensors it holds; not done here.
    partial = [
        p for p, x in flat.items() if isinstance(x, jax.Array) and not x.is_fully_addressable
    ]
    if partial:
        raise CheckpointError(
            f"save_params: {len(partial)} leaves are spread over several processes"
            f" (e.g. {partial[0]}); this example saves from one process: gather them first"
            " (jax.experimental.multihost_utils.process_allgather) or save on one host"
        )
    if jax.process_index() != 0:
        return []

    tensors = list(_hf_tensors(flat, cfg, dtype))  # (name, nbytes, thunk): nothing copied yet
    groups: list[list[tuple[str, int, Any]]] = [[]]
    for t in tensors:
        if (
            max_shard_bytes
            and groups[-1]
            and sum(x[1] for x in groups[-1]) + t[1] > max_shard_bytes
        ):
            groups.append([])
        groups[-1].append(t)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    for old in os.listdir(directory):
        if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", old):
            os.remove(os.path.join(directory, old))
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    )
    written = []
    for file, group in zip(names, groups):
        save_file(
            {n: get() for n, _, get in group},
            os.path.join(directory, file),
            metadata={"format": "pt"},
        )
        written.append(os.path.join(directory, file))
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(t[1] for t in tensors)},
            "weight_map": {n: file for file, group in zip(names, groups) for n, _, _ in group},
        }
        written.append(os.path.join(directory, INDEX))
        with open(written[-1], "w") as f:
            json.dump(index, f, indent=2)
    embedding = flat[("model", "embed_tokens", "embedding")]
    config = {
        **cfg.to_hf(),
        "torch_dtype": str(np.dtype(embedding.dtype if dtype is None else dtype)),
    }
    written.append(os.path.join(directory, CONFIG))
    with open(written[-1], "w") as f:
        json.dump(config, f, indent=2)
    return written


def param_shapes(cfg: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every leaf's path (a tuple of keys) and shape, as `load_params` makes them."""
    L = cfg.num_hidden_layers
    hf = _expected(cfg)
    out: dict[tuple[str, ...], tuple[int, ...]] = {
        ("model", "embed_tokens", "embedding"): hf["model.embed_tokens.weight"][0]
    }
    for path, name, kind in LAYER:
        shape = hf[_layer_name(0, name)][0] if L else (0,)
        out[("model", "layers", *path)] = (L, *(shape if kind == "vector" else shape[::-1]))
    out[("model", "norm", "weight")] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        out[("lm_head", "kernel")] = (cfg.hidden_size, cfg.vocab_size)
    return out


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, dict):
        return [kv for k in tree for kv in _flatten(tree[k], (*prefix, str(k)))]
    return [(prefix, tree)]


def _hf_tensors(flat: dict[tuple[str, ...], Any], cfg: LlamaConfig, dtype: Any) -> Any:
    """``(name, nbytes, get)`` for each Hugging Face tensor, a leaf's layers one after the
    other; ``get()`` returns that tensor in Hugging Face's layout, on the host. Called in
    this order, it copies one leaf to the host at a time (each distinct shard once)."""
    inverse = {
        "q": np.argsort(rope_permutation(cfg.num_attention_heads, cfg.hd)),
        "k": np.argsort(rope_permutation(cfg.kv_heads, cfg.hd)),
    }
    held: dict[int, np.ndarray] = {}  # the leaf on the host now, by id

    def entry(name: str, leaf: Any, layer: int | None, kind: str) -> tuple[str, int, Any]:
        shape = np.shape(leaf)[1:] if layer is not None else np.shape(leaf)
        out_dtype = np.dtype(leaf.dtype if dtype is None else dtype)

        def get() -> np.ndarray:
            if id(leaf) not in held:
                held.clear()
                held[id(leaf)] = _host(leaf)
            x = held[id(leaf)] if layer is None else held[id(leaf)][layer]
            if kind != "vector":
                x = x.T
            if kind in inverse:
                x = x[inverse[kind]]
            return np.ascontiguousarray(x, dtype=out_dtype)

        return name, int(np.prod(shape)) * out_dtype.itemsize, get

    yield entry(
        "model.embed_tokens.weight", flat[("model", "embed_tokens", "embedding")], None, "vector"
    )
    for path, name, kind in LAYER:
        for i in range(cfg.num_hidden_layers):
            yield entry(_layer_name(i, name), flat[("model", "layers", *path)], i, kind)
    yield entry("model.norm.weight", flat[("model", "norm", "weight")], None, "vector")
    if not cfg.tie_word_embeddings:
        yield entry("lm_head.weight", flat[("lm_head", "kernel")], None, "linear")


def _host(leaf: Any) -> np.ndarray:
    """``leaf`` as one numpy array, assembled from the shards this process holds (each
    distinct shard copied once, no device computation)."""
    if not isinstance(leaf, jax.Array):
        return np.asarray(leaf)
    out = np.empty(leaf.shape, leaf.dtype)
    done = set()
    for shard in leaf.addressable_shards:
        key = tuple(s.indices(n) for s, n in zip(shard.index, leaf.shape))
        if key not in done:
            done.add(key)
            out[shard.index] = np.asarray(shard.data)
    return out
