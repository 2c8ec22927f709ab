"""Megatron rule sets for Hugging Face models: ``tx.rules.llama()``, ``gpt2()``, ``bert()``.

Each set matches a model's parameter names in both of Hugging Face's spellings:

* Flax, as a nested pytree: ``model/layers/0/self_attn/q_proj/kernel``, kernels
  ``(d_in, d_out)``;
* safetensors (PyTorch) names as the keys of a flat dict:
  ``model.layers.0.self_attn.q_proj.weight``, Linear weights ``(d_out, d_in)``, so a
  column-parallel weight is ``P(axis, None)`` there and ``P(None, axis)`` as a kernel.

Patterns end with ``$`` so that optimizer state (whose paths end with the parameter's
path) is laid out like its parameter. The sets are strict like every `Rules`: a leaf they
do not know is an error that lists it. Replicating it would be numerically safe, but a
projection the set does not know (a fused ``qkv_proj``, an adapter) would then run
replicated on every device without a word, which is what these sets exist to prevent.
End them with ``+ tx.Rules((r".*", P()))`` to replicate the rest knowingly.
"""

from __future__ import annotations

from typing import Literal

from jax.sharding import PartitionSpec

from titanax.errors import RuleError
from titanax.parallel.rules import Rules

__all__ = ["llama", "gpt2", "bert"]

_SEP = r"[./]"  # Flax paths join keys with "/", safetensors names with "."
Rule = tuple[str, PartitionSpec]


def _path(*parts: str) -> str:
    """A pattern for path components ``parts``, starting at a component boundary, at the end."""
    return r"(?:^|[./])" + _SEP.join(parts) + "$"


def _layer(name: str, stacked: bool) -> str:
    """The layer-list component: ``layers/<i>`` one layer at a time, ``layers`` when stacked."""
    return name if stacked else rf"{name}{_SEP}\d+"


def _linear(
    parts: tuple[str, ...],
    kind: Literal["column", "row", "replicated"],
    axis: str,
    *,
    lead: tuple[None, ...],
    kernel_in_first: bool = True,
) -> list[Rule]:
    """Rules for a linear layer's ``kernel`` (Flax), ``weight`` (PyTorch) and ``bias``.

    ``kernel_in_first``: Flax ``Dense`` kernels are ``(d_in, d_out)`` and PyTorch ``Linear``
    weights ``(d_out, d_in)``; GPT-2 is the other way round in both (``Conv1D``).
    """
    if kind == "replicated":
        return [(_path(*parts, "(?:kernel|weight|bias)"), PartitionSpec())]
    split_out = kind == "column"
    in_first = PartitionSpec(*lead, None, axis) if split_out else PartitionSpec(*lead, axis, None)
    out_first = PartitionSpec(*lead, axis, None) if split_out else PartitionSpec(*lead, None, axis)
    return [
        (_path(*parts, "kernel"), in_first if kernel_in_first else out_first),
        (_path(*parts, "weight"), out_first if kernel_in_first else in_first),
        (_path(*parts, "bias"), PartitionSpec(*lead, axis) if split_out else PartitionSpec()),
    ]


def _vocab(parts: tuple[str, ...], axis: str, on: bool) -> list[Rule]:
    """An embedding table ``(vocab, d)``: Flax ``embedding``, PyTorch ``weight``."""
    return [
        (
            _path(*parts, "(?:embedding|weight)"),
            PartitionSpec(axis, None) if on else PartitionSpec(),
        )
    ]


def _check(fn: str, axis: object, flags: dict[str, object]) -> None:
    if not (isinstance(axis, str) and axis):
        raise RuleError(f"tx.rules.{fn}: axis must be a mesh axis name (a str), got {axis!r}.")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise RuleError(f"tx.rules.{fn}: {name} must be True or False, got {value!r}.")


def _kv_layout(
    axis: str, num_key_value_heads: int | None, axis_size: int | None
) -> tuple[bool, str]:
    """Whether k_proj/v_proj are split along ``axis``, and the note that says why."""
    given = {"num_key_value_heads": num_key_value_heads, "axis_size": axis_size}
    for name, value in given.items():
        if value is not None and not (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            raise RuleError(f"tx.rules.llama: {name} must be a positive int, got {value!r}.")
    if num_key_value_heads is None and axis_size is None:
        return True, (
            f"k_proj/v_proj are column-parallel (split on KV heads along {axis!r}): this assumes "
            f"num_key_value_heads divides by the size of {axis!r}. Pass num_key_value_heads= and "
            "axis_size= to have it checked: with fewer KV heads than devices a split cuts heads "
            "apart and XLA moves them between devices in every layer."
        )
    if num_key_value_heads is None or axis_size is None:
        have, missing = (
            ("num_key_value_heads", "axis_size")
            if axis_size is None
            else ("axis_size", "num_key_value_heads")
        )
        raise RuleError(
            f"tx.rules.llama: {have}={given[have]} was given without {missing}. Whether "
            "k_proj/v_proj can be split depends on both (the KV heads must divide by the axis "
            f"size): pass both, e.g. tx.rules.llama(num_key_value_heads=cfg.num_key_value_heads, "
            f'axis_size=mesh.shape["{axis}"]), or neither to split them unchecked.'
        )
    kv, n = num_key_value_heads, axis_size
    if kv % n == 0:
        return True, (
            f"k_proj/v_proj are column-parallel: {kv} KV heads over {axis}={n}, "
            f"{kv // n} whole head{'s' if kv // n > 1 else ''} per device."
        )
    return False, (
        f"k_proj/v_proj are replicated along {axis!r}: num_key_value_heads={kv} does not divide "
        f"by {axis}={n}, and a column split would cut KV heads apart (XLA then moves k and v "
        "between devices in every layer). Every device computes all KV heads whole, as "
        "Megatron-LM does when the tensor-parallel size exceeds the query groups; each device "
        f"holds and computes the whole k/v projections, {n} times its share."
    )


def llama(
    *,
    axis: str = "model",
    num_key_value_heads: int | None = None,
    axis_size: int | None = None,
    stacked: bool = False,
) -> Rules:
    """Megatron tensor-parallel rules for Hugging Face Llama (and Mistral, Qwen2) names.

    ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj`` and ``up_proj`` are column-parallel
    (split on heads / hidden units), ``o_proj`` and ``down_proj`` row-parallel, so the
    activations stay split inside each block and only all-reduces leave it (the bytes are
    measured in docs/tensor_parallel.md). ``embed_tokens`` and ``lm_head`` are split on the vocabulary
    (logits come out split on it; softmax and cross-entropy reduce across devices).
    Norms, biases of row-parallel layers and RoPE buffers (``rotary_emb.inv_freq``) are
    replicated. Names are matched as Flax paths (``model/layers/0/self_attn/q_proj/kernel``)
    and as safetensors names (``model.layers.0.self_attn.q_proj.weight``, weights stored
    ``(d_out, d_in)``). Any other leaf is an error (see the module's note on strictness).

    Grouped-query attention: k_proj/v_proj hold ``num_key_value_heads`` heads. When they
    divide by the axis size the projections are split like q_proj. When they do not
    (2 KV heads on ``model=4``) a split would cut heads apart, so k_proj and v_proj are
    **replicated**: each device computes all KV heads whole, and its query heads use
    theirs (Megatron-LM does the same when the tensor-parallel size exceeds the query
    groups). The decision is printed by ``rules.explain`` (``rules.notes``) and the rules
    check on use that the mesh's axis has ``axis_size`` devices. With neither argument the
    projections are split unchecked (a note says so); one without the other is an error.

    Args:
      axis: the tensor-parallel mesh axis.
      num_key_value_heads: the model's KV heads (``config.num_key_value_heads``).
      axis_size: the size of ``axis`` in the mesh the rules are for (``mesh.shape[axis]``).
      stacked: the decoder layers are stacked on a leading layer dimension and their
        paths have no layer index (``model/layers/self_attn/q_proj/kernel``, as in
        ``examples/llama``): their specs get a leading ``None``. With ``False``, paths
        carry the index (``model/layers/0/...``), as Hugging Face's do.

    Returns:
      A `Rules`, with ``notes`` on the k/v decision and ``axis_sizes`` when given.

    Raises:
      RuleError: an axis that is not a str, a count that is not a positive int, or only
        one of ``num_key_value_heads`` and ``axis_size``.

    Examples:
      >>> import titanax as tx
      >>> rules = tx.rules.llama(num_key_value_heads=8, axis_size=4)
      >>> rules.spec_for("model/layers/0/self_attn/q_proj/kernel")       # Flax: (d_in, d_out)
      P(None, 'model')
      >>> rules.spec_for("model.layers.0.self_attn.q_proj.weight")       # safetensors: (d_out, d_in)
      P('model', None)
      >>> rules.spec_for("opt_state/0/mu/model/layers/3/mlp/down_proj/kernel")
      P('model', None)
      >>> rules.spec_for("model/embed_tokens/embedding"), rules.spec_for("lm_head/kernel")
      (P('model', None), P(None, 'model'))
      >>> gqa = tx.rules.llama(num_key_value_heads=2, axis_size=4)
      >>> gqa.spec_for("model/layers/0/self_attn/k_proj/kernel")
      P()
      >>> gqa.notes[0][:60]
      "k_proj/v_proj are replicated along 'model': num_key_value_he"
      >>> tx.rules.llama(stacked=True).spec_for("model/layers/self_attn/o_proj/kernel")
      P(None, 'model', None)
    """
    _check("llama", axis, {"stacked": stacked})
    split_kv, note = _kv_layout(axis, num_key_value_heads, axis_size)
    lead = (None,) if stacked else ()
    layer = _layer("layers", stacked)
    rules: list[Rule] = []
    for proj in ("q_proj", "k_proj", "v_proj"):
        kind: Literal["column", "replicated"] = (
            "column" if proj == "q_proj" or split_kv else "replicated"
        )
        rules += _linear((layer, "self_attn", proj), kind, axis, lead=lead)
    rules += _linear((layer, "self_attn", "o_proj"), "row", axis, lead=lead)
    rules += _linear((layer, "mlp", "(?:gate_proj|up_proj)"), "column", axis, lead=lead)
    rules += _linear((layer, "mlp", "down_proj"), "row", axis, lead=lead)
    rules += _vocab(("embed_tokens",), axis, True)
    rules += _linear(("lm_head",), "column", axis, lead=())
    rules += [
        # input_layernorm, post_attention_layernorm, the final norm, Qwen3's q_norm/k_norm.
        (_path(r"\w*norm", "(?:weight|scale|bias)"), PartitionSpec()),
        (_path("rotary_emb", "inv_freq"), PartitionSpec()),  # a buffer in older checkpoints
    ]
    sizes = {axis: axis_size} if axis_size is not None else None
    return Rules(*rules, notes=(note,), axis_sizes=sizes)


def gpt2(
    *,
    axis: str = "model",
    qkv: Literal["fused", "split"] = "fused",
    vocab_parallel: bool = True,
    stacked: bool = False,
) -> Rules:
    """Megatron tensor-parallel rules for Hugging Face GPT-2 names.

    ``attn/c_attn`` and ``mlp/c_fc`` are column-parallel, ``attn/c_proj`` and
    ``mlp/c_proj`` row-parallel; ``wte`` (and an untied ``lm_head``) are split on the
    vocabulary, ``wpe``, the LayerNorms and the attention-mask buffers
    (``attn.bias``, ``attn.masked_bias``) replicated. GPT-2's projections are
    ``Conv1D``: PyTorch stores them ``(d_in, d_out)`` (the reverse of ``Linear``) and
    Flax ``(d_out, d_in)``; the rules follow each.

    ``c_attn`` is q, k and v **fused** along its output (``3 * n_embd``). Split as
    stored (``qkv="fused"``) its shards do not fall on heads: on ``model=4`` device 0
    holds the first three quarters of q, device 1 the rest of q and half of k, so XLA
    moves q, k and v between devices in every block (measured in
    docs/tensor_parallel.md: about 1.7 times Megatron's bytes a step, in permutes and
    all-to-alls).
    To reach Megatron's communication, reshape it so that q, k and v are a separate
    dimension and compute them with one einsum, then use ``qkv="split"``:

    * Flax: ``kernel (3n, n) -> kernel.reshape(3, n, n)``, spec ``P(None, axis, None)``;
      ``q, k, v = jnp.einsum("btd,ked->kbte", x, kernel) + bias[:, None, None]``;
    * PyTorch: ``weight (n, 3n) -> weight.reshape(n, 3, n)``, spec ``P(None, None, axis)``;
    * the bias ``(3n,) -> (3, n)``, spec ``P(None, axis)``.

    Args:
      axis: the tensor-parallel mesh axis.
      qkv: ``"fused"``: ``c_attn`` as Hugging Face stores it (a note says what it costs);
        ``"split"``: reshaped as above.
      vocab_parallel: split ``wte``/``lm_head`` on the vocabulary. GPT-2's 50257 is odd
        (29 x 1733); pad the vocabulary (Megatron pads to a multiple of 128) or pass
        ``False`` to replicate them.
      stacked: blocks stacked on a leading dimension, paths without an index
        (``transformer/h/attn/...``): their specs get a leading ``None``.

    Returns:
      A `Rules`, with notes on the fused ``c_attn`` (``qkv="fused"``) and on the
      vocabulary's size (``vocab_parallel=True``).

    Raises:
      RuleError: an axis that is not a str, or a ``qkv`` that is neither choice.

    Examples:
      >>> import titanax as tx
      >>> rules = tx.rules.gpt2()
      >>> rules.spec_for("transformer/h/0/mlp/c_fc/kernel")   # Flax: (d_out, d_in)
      P('model', None)
      >>> rules.spec_for("transformer.h.0.mlp.c_fc.weight")   # PyTorch Conv1D: (d_in, d_out)
      P(None, 'model')
      >>> rules.spec_for("h.0.attn.bias")                     # the causal-mask buffer
      P()
      >>> tx.rules.gpt2(qkv="split").spec_for("transformer/h/0/attn/c_attn/kernel")
      P(None, 'model', None)
    """
    _check("gpt2", axis, {"vocab_parallel": vocab_parallel, "stacked": stacked})
    if qkv not in ("fused", "split"):
        raise RuleError(f"tx.rules.gpt2: qkv must be one of 'fused', 'split'; got {qkv!r}.")
    lead = (None,) if stacked else ()
    block = _layer("h", stacked)

    def conv(parts: tuple[str, ...], kind: Literal["column", "row"]) -> list[Rule]:
        return _linear(parts, kind, axis, lead=lead, kernel_in_first=False)

    rules: list[Rule] = []
    if qkv == "fused":
        rules += conv((block, "attn", "c_attn"), "column")
        notes = [
            "c_attn is q|k|v fused along its output: split as stored, its shards do not fall "
            "on heads and XLA moves q, k and v between devices in every block. For Megatron's "
            "communication reshape it to (3, n_embd, n_embd) (PyTorch: (n_embd, 3, n_embd)), "
            "compute q, k, v with one einsum and use tx.rules.gpt2(qkv='split')."
        ]
    else:
        c_attn = (block, "attn", "c_attn")
        rules += [
            (_path(*c_attn, "kernel"), PartitionSpec(*lead, None, axis, None)),
            (_path(*c_attn, "weight"), PartitionSpec(*lead, None, None, axis)),
            (_path(*c_attn, "bias"), PartitionSpec(*lead, None, axis)),
        ]
        notes = []
    if vocab_parallel:
        notes.append(
            f"wte and lm_head are split on the vocabulary, which must divide by the size of "
            f"{axis!r}: pad GPT-2's 50257 (Megatron pads to a multiple of 128), or pass "
            "vocab_parallel=False to replicate them."
        )
    rules += conv((block, "attn", "c_proj"), "row")
    rules += conv((block, "mlp", "c_fc"), "column")
    rules += conv((block, "mlp", "c_proj"), "row")
    rules += [(_path(block, "attn", "(?:masked_)?bias"), PartitionSpec())]  # mask buffers
    rules += [(_path("(?:ln_1|ln_2|ln_f)", "(?:scale|weight|bias)"), PartitionSpec())]
    rules += _vocab(("wte",), axis, vocab_parallel)
    rules += [(_path("wpe", "(?:embedding|weight)"), PartitionSpec())]
    rules += _linear(("lm_head",), "column" if vocab_parallel else "replicated", axis, lead=())
    return Rules(*rules, notes=notes)


def bert(
    *,
    axis: str = "model",
    vocab_parallel: bool = True,
    stacked: bool = False,
) -> Rules:
    """Megatron tensor-parallel rules for Hugging Face BERT names.

    In each ``encoder/layer/<i>``: ``attention/self/query``, ``key``, ``value`` and
    ``intermediate/dense`` are column-parallel, ``attention/output/dense`` and
    ``output/dense`` row-parallel. ``embeddings/word_embeddings`` and the masked-LM
    head's vocabulary leaves (``cls/predictions/bias``, an untied ``decoder``) are split
    on the vocabulary; position and token-type embeddings, every LayerNorm (``scale``,
    ``weight``, ``bias``, and the older ``gamma``/``beta``), the pooler, the MLM
    transform, the next-sentence head and a ``classifier``/``qa_outputs`` head are
    replicated (small, and followed by reductions over the whole hidden size).

    Args:
      axis: the tensor-parallel mesh axis.
      vocab_parallel: split the vocabulary leaves. BERT's 30522 does not divide
        by 4 or 8; pad the vocabulary or pass ``False`` to replicate them.
      stacked: layers stacked on a leading dimension, paths without an index
        (``encoder/layer/attention/...``): their specs get a leading ``None``.

    Returns:
      A `Rules`.

    Raises:
      RuleError: an axis that is not a str.

    Examples:
      >>> import titanax as tx
      >>> rules = tx.rules.bert()
      >>> rules.spec_for("bert/encoder/layer/0/attention/self/query/kernel")
      P(None, 'model')
      >>> rules.spec_for("bert/encoder/layer/0/attention/output/dense/kernel")
      P('model', None)
      >>> rules.spec_for("bert.encoder.layer.0.output.dense.weight")   # (d_out, d_in)
      P(None, 'model')
      >>> rules.spec_for("cls/predictions/bias")
      P('model',)
    """
    _check("bert", axis, {"vocab_parallel": vocab_parallel, "stacked": stacked})
    lead = (None,) if stacked else ()
    layer = _layer("layer", stacked)
    vocab: Literal["column", "replicated"] = "column" if vocab_parallel else "replicated"
    rules: list[Rule] = []
    rules += _linear((layer, "attention", "self", "(?:query|key|value)"), "column", axis, lead=lead)
    rules += _linear((layer, "attention", "output", "dense"), "row", axis, lead=lead)
    rules += _linear((layer, "intermediate", "dense"), "column", axis, lead=lead)
    rules += _linear((layer, "output", "dense"), "row", axis, lead=lead)
    rules += [(_path("LayerNorm", "(?:scale|weight|bias|gamma|beta)"), PartitionSpec())]
    rules += _vocab(("embeddings", "word_embeddings"), axis, vocab_parallel)
    rules += [
        (
            _path("embeddings", "(?:position|token_type)_embeddings", "(?:embedding|weight)"),
            PartitionSpec(),
        ),
        (_path("embeddings", "position_ids"), PartitionSpec()),  # a buffer in older checkpoints
        (_path("predictions", "bias"), PartitionSpec(axis) if vocab_parallel else PartitionSpec()),
    ]
    rules += _linear(("predictions", "decoder"), vocab, axis, lead=())
    for head in (
        ("pooler", "dense"),
        ("predictions", "transform", "dense"),
        ("seq_relationship",),
        ("classifier",),
        ("qa_outputs",),
    ):
        rules += _linear(head, "replicated", axis, lead=())
    return Rules(*rules)
