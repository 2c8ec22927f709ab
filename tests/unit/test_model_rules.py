"""``tx.rules.llama``, ``gpt2`` and ``bert`` on Hugging Face's real parameter names.

The names and shapes are those of transformers' own models (Flax and PyTorch, 4.57.6),
generated without a download by ``data/gen_hf_param_shapes.py`` into
``data/hf_param_shapes.json``; the legacy names below are from published checkpoints.
The expected layouts are written here from the models' semantics (which dimension of
which weight is its output), independently of the rules' patterns; the numerical and
HLO tests then check that the layouts are Megatron's in a real forward and backward pass.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax.parallel import hlo

with open(os.path.join(os.path.dirname(__file__), "data", "hf_param_shapes.json")) as _f:
    HF = json.load(_f)
CFG = HF["config"]
AXIS = "model"

# Names in published checkpoints that transformers' current models no longer produce:
# GPT-2's (openai-community/gpt2 model.safetensors) have no "transformer." prefix and keep the
# causal-mask buffers; older Llama conversions keep RoPE's inv_freq; BERT's original
# (google-bert/bert-base-uncased pytorch_model.bin) names LayerNorm parameters gamma/beta.
LEGACY = {
    "gpt2": {
        "h.0.attn.bias": [1, 1, 32, 32],
        "h.0.attn.masked_bias": [],
        "h.0.attn.c_attn.weight": [64, 192],
        "h.0.attn.c_attn.bias": [192],
        "h.0.mlp.c_proj.weight": [256, 64],
        "wte.weight": [128, 64],
        "ln_f.weight": [64],
    },
    "llama": {"model.layers.0.self_attn.rotary_emb.inv_freq": [4]},
    "bert": {
        "bert.embeddings.LayerNorm.gamma": [64],
        "bert.embeddings.LayerNorm.beta": [64],
        "bert.embeddings.position_ids": [1, 32],
        "bert.encoder.layer.0.attention.output.LayerNorm.gamma": [64],
    },
}

# What each PyTorch tensor is, by name (the last components), from the architectures:
# "col": a projection whose output is split (Megatron column-parallel), "row": one whose
# input is split, "vocab": split on the vocabulary, "rep": replicated. First match wins.
ROLES = {
    "llama": [
        (r"self_attn\.q_proj\.weight", "col"),
        (r"self_attn\.[kv]_proj\.weight", "kv"),
        (r"self_attn\.o_proj\.weight", "row"),
        (r"mlp\.(gate|up)_proj\.weight", "col"),
        (r"mlp\.down_proj\.weight", "row"),
        (r"(embed_tokens|lm_head)\.weight", "vocab"),
        (r"norm\.weight|inv_freq", "rep"),
    ],
    "gpt2": [
        (r"attn\.c_attn\.(weight|bias)", "col"),
        (r"attn\.c_proj\.weight", "row"),
        (r"mlp\.c_fc\.(weight|bias)", "col"),
        (r"mlp\.c_proj\.weight", "row"),
        (r"(wte|lm_head)\.weight", "vocab"),
        (r"c_proj\.bias|ln_\w\.(weight|bias)|wpe\.weight|attn\.(masked_)?bias", "rep"),
    ],
    "bert": [
        (r"attention\.self\.(query|key|value)\.(weight|bias)", "col"),
        (r"attention\.output\.dense\.weight", "row"),
        (r"intermediate\.dense\.(weight|bias)", "col"),
        (r"layer\.\d+\.output\.dense\.weight", "row"),
        (r"word_embeddings\.weight|predictions\.(decoder\.)?(weight|bias)", "vocab"),
        (r"output\.dense\.bias|LayerNorm|pooler|transform|seq_relationship|position", "rep"),
        (r"token_type_embeddings", "rep"),
    ],
}


def expected_torch(model, name, shape, kv_split=True):
    """The spec of a PyTorch tensor from its role. Linear weights are (out, in); GPT-2's
    Conv1D weights (in, out); biases and vocab tables (vocab, d) split on dimension 0."""
    role = next(r for pattern, r in ROLES[model] if re.search(pattern, name))
    if role == "kv":
        role = "col" if kv_split else "rep"
    if role == "rep":
        return P()
    if role == "vocab" or len(shape) == 1:
        return P(AXIS) if len(shape) == 1 else P(AXIS, None)
    out_first = model != "gpt2"
    return P(AXIS, None) if (role == "col") == out_first else P(None, AXIS)


def flax_to_torch(model, path):
    """The PyTorch name of a Flax leaf, and whether its tensor is the transpose."""
    name = path.replace("/", ".")
    name = re.sub(r"\.(kernel|embedding|scale)$", ".weight", name)
    return name, path.endswith("/kernel")


def full(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


def nest(flat, sep="/"):
    tree = {}
    for path, shape in flat.items():
        *keys, last = path.split(sep)
        node = tree
        for k in keys:
            node = node.setdefault(k, {})
        node[last] = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    return tree


def flat_specs(rules, tree, mesh=None):
    specs = rules.specs(tree, mesh)
    leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, P))[0]
    return {jax.tree_util.keystr(k, simple=True, separator="/"): s for k, s in leaves}


@pytest.fixture(scope="module")
def mesh():
    return tx.mesh(devices=jax.devices()[:4], model=4)


RULES = {
    "llama": lambda: tx.rules.llama(num_key_value_heads=2, axis_size=4),
    "mistral": lambda: tx.rules.llama(num_key_value_heads=2, axis_size=4),
    "gpt2": tx.rules.gpt2,
    "bert": tx.rules.bert,
}


@pytest.mark.parametrize("model", ["llama", "mistral", "gpt2", "bert"])
def test_every_safetensors_name_has_its_role_spec(model, mesh):
    names = {**HF[model]["torch"], **LEGACY.get(model, {})}
    specs = flat_specs(
        RULES[model](),
        {k: jax.ShapeDtypeStruct(tuple(s), jnp.float32) for k, s in names.items()},
        mesh,
    )
    roles = "llama" if model == "mistral" else model
    wrong = {
        name: (specs[name], want)
        for name, shape in names.items()
        if full(specs[name], len(shape))
        != full(want := expected_torch(roles, name, shape, kv_split=False), len(shape))
    }
    assert not wrong
    assert len(specs) == len(names)


@pytest.mark.parametrize("model", ["llama", "mistral", "gpt2", "bert"])
def test_flax_names_take_the_spec_of_the_same_tensor_in_torch(model, mesh):
    flax, torch = HF[model]["flax"], HF[model]["torch"]
    rules = RULES[model]()
    specs = flat_specs(rules, nest(flax), mesh)
    assert set(specs) == set(flax)  # every leaf matched (specs raises otherwise)
    checked = 0
    for path, shape in flax.items():
        name, transposed = flax_to_torch(model, path)
        assert tuple(torch[name]) == (tuple(reversed(shape)) if transposed else tuple(shape)), name
        want = full(rules.spec_for(name), len(shape))
        got = full(specs[path], len(shape))
        assert got == (tuple(reversed(want)) if transposed else want), (path, got, want)
        checked += 1
    assert checked == len(flax)


def test_the_model_splits_what_megatron_splits():
    """Counts by role on the Flax tree: nothing large is left replicated by accident."""
    specs = flat_specs(
        tx.rules.llama(num_key_value_heads=2, axis_size=4), nest(HF["llama"]["flax"])
    )
    split = sorted({re.sub(r"/\d+/", "/*/", p) for p, s in specs.items() if AXIS in s})
    assert split == [
        "lm_head/kernel",
        "model/embed_tokens/embedding",
        "model/layers/*/mlp/down_proj/kernel",
        "model/layers/*/mlp/gate_proj/kernel",
        "model/layers/*/mlp/up_proj/kernel",
        "model/layers/*/self_attn/o_proj/kernel",
        "model/layers/*/self_attn/q_proj/kernel",
    ]


def test_stacked_layers_get_a_leading_none(mesh):
    flax = HF["llama"]["flax"]
    stacked = {}
    for path, shape in flax.items():
        if "/layers/" in path:
            stacked[re.sub(r"/layers/\d+/", "/layers/", path)] = [2, *shape]
        else:
            stacked[path] = shape
    per_layer = tx.rules.llama(num_key_value_heads=2, axis_size=4)
    specs = flat_specs(
        tx.rules.llama(num_key_value_heads=2, axis_size=4, stacked=True), nest(stacked), mesh
    )
    for path, spec in specs.items():
        one = per_layer.spec_for(path.replace("/layers/", "/layers/0/"))
        assert spec == (P(None, *one) if "/layers/" in path and one != P() else one), path
    assert specs["model/layers/self_attn/q_proj/kernel"] == P(None, None, AXIS)
    # The wrong form is an error that lists the leaves, never a layout on the wrong dimension.
    with pytest.raises(
        tx.RuleError, match=r"match no rule:(.|\n)*model/layers/self_attn/q_proj/kernel"
    ):
        per_layer.specs(nest(stacked), mesh)
    with pytest.raises(tx.RuleError, match=r"model/layers/0/mlp/up_proj/kernel"):
        tx.rules.llama(stacked=True).specs(nest(flax))


@pytest.mark.parametrize(
    "kv, size, split",
    [
        (8, 4, True),
        (4, 4, True),
        (2, 4, False),
        (1, 4, False),
        (6, 4, False),
        (1, 1, True),
        (None, None, True),
    ],
)
def test_grouped_query_attention_keeps_kv_heads_whole(kv, size, split):
    rules = tx.rules.llama(num_key_value_heads=kv, axis_size=size)
    for name in (
        "model/layers/0/self_attn/k_proj/kernel",
        "model.layers.3.self_attn.v_proj.weight",
    ):
        spec = rules.spec_for(name)
        assert (spec != P()) == split, (name, spec)
    assert rules.spec_for("model/layers/0/self_attn/q_proj/kernel") == P(None, AXIS)  # always split
    assert len(rules.notes) == 1
    note = rules.notes[0]
    if kv is None:
        assert "assumes num_key_value_heads divides" in note
    elif split:
        assert f"{kv} KV heads over model={size}" in note
    else:
        assert (
            f"replicated along 'model': num_key_value_heads={kv} does not divide by model={size}"
            in note
        )
    assert rules.axis_sizes == ({} if size is None else {AXIS: size})


def test_the_note_is_printed_by_explain_and_the_mesh_size_checked(mesh):
    tree = nest({k: v for k, v in HF["llama"]["flax"].items() if "/1/" not in k})
    text = tx.rules.llama(num_key_value_heads=2, axis_size=4).explain(tree, mesh)
    assert re.search(r"self_attn/k_proj/kernel\s+\(64, 16\)\s+P\(\)", text)
    assert "notes:\n  * k_proj/v_proj are replicated along 'model'" in text
    with pytest.raises(
        tx.RuleError,
        match=r'built for model=2 \(the mesh has model=4\).*axis_size=mesh.shape\["model"\]',
    ):
        tx.rules.llama(num_key_value_heads=2, axis_size=2).specs(tree, mesh)
    plus = tx.rules.llama(num_key_value_heads=2, axis_size=4) + tx.Rules((r".*", P()))
    assert plus.notes and plus.axis_sizes == {AXIS: 4}
    with pytest.raises(tx.RuleError, match="written for model=4 to rules written for model=2"):
        plus + tx.rules.llama(num_key_value_heads=1, axis_size=2)


def test_errors_name_the_argument_and_the_fix():
    with pytest.raises(
        tx.RuleError,
        match=r"num_key_value_heads=2 was given without axis_size.*mesh.shape\[\"model\"\]",
    ):
        tx.rules.llama(num_key_value_heads=2)
    with pytest.raises(tx.RuleError, match="axis_size=4 was given without num_key_value_heads"):
        tx.rules.llama(axis_size=4)
    with pytest.raises(tx.RuleError, match="num_key_value_heads must be a positive int, got 0"):
        tx.rules.llama(num_key_value_heads=0, axis_size=4)
    with pytest.raises(tx.RuleError, match="axis_size must be a positive int, got 2.0"):
        tx.rules.llama(num_key_value_heads=2, axis_size=2.0)
    with pytest.raises(tx.RuleError, match="axis must be a mesh axis name"):
        tx.rules.bert(axis=None)
    with pytest.raises(tx.RuleError, match="stacked must be True or False, got 'yes'"):
        tx.rules.gpt2(stacked="yes")
    with pytest.raises(tx.RuleError, match="qkv must be one of 'fused', 'split'; got 'qkv'"):
        tx.rules.gpt2(qkv="qkv")
    # A leaf the set does not know (a fused projection) is listed, not replicated in silence.
    with pytest.raises(
        tx.RuleError,
        match=r"1 leaf of the tree matches no rule:\n  \* model/layers/0/self_attn/qkv_proj/kernel",
    ):
        tx.rules.llama().specs(
            {
                "model": {
                    "layers": {"0": {"self_attn": {"qkv_proj": {"kernel": jnp.zeros((4, 12))}}}}
                }
            }
        )


def test_vocab_parallel_off_and_other_axes():
    rules = tx.rules.bert(vocab_parallel=False, axis="tp")
    assert rules.spec_for("bert/embeddings/word_embeddings/embedding") == P()
    assert rules.spec_for("cls.predictions.decoder.weight") == P()
    assert rules.spec_for("cls/predictions/bias") == P()
    assert rules.spec_for("bert/encoder/layer/0/intermediate/dense/kernel") == P(None, "tp")
    assert tx.rules.gpt2(vocab_parallel=False).spec_for("transformer/wte/embedding") == P()
    assert tx.rules.gpt2(stacked=True).spec_for("transformer.h.mlp.c_fc.weight") == P(
        None, None, AXIS
    )
    assert tx.rules.bert(stacked=True).spec_for("encoder/layer/output/dense/kernel") == P(
        None, AXIS, None
    )


# ----------------------------------------------------------------------------------------
# Numbers and communication: small forward and backward passes written here in pure JAX
# on the real Flax trees (one layer), under tx.tensor_parallel on model=4, against one device.

B, T = 4, 16


def init(flax, seed=0, layers=1):
    """Random parameters for the Flax names of the first ``layers`` layers."""
    keep = {
        p: s for p, s in flax.items() if not (m := re.search(r"/(\d+)/", p)) or int(m[1]) < layers
    }
    rng = np.random.default_rng(seed)  # numpy: no random-number program compiled per shape
    flat = {
        p: (0.2 * rng.normal(size=tuple(s))).astype(np.float32) for p, s in sorted(keep.items())
    }
    return _fill(nest(keep), flat)


def _fill(tree, flat, prefix=""):
    return {
        k: _fill(v, flat, f"{prefix}{k}/") if isinstance(v, dict) else flat[f"{prefix}{k}"]
        for k, v in tree.items()
    }


def tokens(vocab, seed=1, shape=(B, T)):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def attention(q, k, v):
    """Causal softmax attention of (B, T, heads, hd); k, v repeated to q's heads as in
    Hugging Face's repeat_kv (query head h uses KV head h // (heads // kv_heads))."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = jnp.where(jnp.tril(jnp.ones((q.shape[1], q.shape[1]), bool)), s, -1e9)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)


def rope(x):
    """Hugging Face's RoPE on (B, T, heads, hd): rotate_half pairs dimension i with
    i + hd/2, so a device holding half a head must fetch the other half."""
    hd = x.shape[-1]
    freqs = np.arange(x.shape[1])[:, None] / 10000 ** (np.arange(0, hd, 2) / hd)
    emb = np.concatenate([freqs, freqs], -1)[:, None, :].astype(np.float32)
    rotated = jnp.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def cross_entropy(logits, targets):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1))


def rms_norm(w, x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


def layer_norm(p, x):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def llama_loss(p, ids):
    cfg = CFG["llama"]
    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    b, t = ids.shape
    x = p["model"]["embed_tokens"]["embedding"][ids]
    for i in sorted(p["model"]["layers"], key=int):
        lp = p["model"]["layers"][i]
        a, m = lp["self_attn"], lp["mlp"]
        h = rms_norm(lp["input_layernorm"]["weight"], x)
        q = rope((h @ a["q_proj"]["kernel"]).reshape(b, t, heads, hd))
        k = rope((h @ a["k_proj"]["kernel"]).reshape(b, t, kv, hd))
        v = (h @ a["v_proj"]["kernel"]).reshape(b, t, kv, hd)
        x = x + attention(q, k, v).reshape(b, t, heads * hd) @ a["o_proj"]["kernel"]
        h = rms_norm(lp["post_attention_layernorm"]["weight"], x)
        gate = jax.nn.silu(h @ m["gate_proj"]["kernel"]) * (h @ m["up_proj"]["kernel"])
        x = x + gate @ m["down_proj"]["kernel"]
    logits = rms_norm(p["model"]["norm"]["weight"], x) @ p["lm_head"]["kernel"]
    return cross_entropy(logits, jnp.roll(ids, -1, axis=1))


def gpt2_loss(p, ids):
    """Hugging Face's Flax GPT-2: Conv1D kernels (d_out, d_in), so x @ kernel.T; the
    embedding tied to the LM head. A 3-D c_attn is the qkv="split" layout."""
    n, heads = CFG["gpt2"]["n_embd"], CFG["gpt2"]["n_head"]
    b, t = ids.shape
    tr = p["transformer"]
    x = tr["wte"]["embedding"][ids] + tr["wpe"]["embedding"][:t]
    for i in sorted(tr["h"], key=int):
        blk = tr["h"][i]
        h = layer_norm(blk["ln_1"], x)
        w, bias = blk["attn"]["c_attn"]["kernel"], blk["attn"]["c_attn"]["bias"]
        if w.ndim == 3:  # (3, n, n): q, k, v with one einsum
            q, k, v = jnp.einsum("btd,ked->kbte", h, w) + bias[:, None, None]
        else:  # as Hugging Face computes it: one matmul, then split along the output
            q, k, v = jnp.split(h @ w.T + bias, 3, axis=-1)
        q, k, v = (z.reshape(b, t, heads, n // heads) for z in (q, k, v))
        o = attention(q, k, v).reshape(b, t, n)
        x = x + o @ blk["attn"]["c_proj"]["kernel"].T + blk["attn"]["c_proj"]["bias"]
        h = jax.nn.gelu(
            layer_norm(blk["ln_2"], x) @ blk["mlp"]["c_fc"]["kernel"].T + blk["mlp"]["c_fc"]["bias"]
        )
        x = x + h @ blk["mlp"]["c_proj"]["kernel"].T + blk["mlp"]["c_proj"]["bias"]
    logits = layer_norm(tr["ln_f"], x) @ tr["wte"]["embedding"].T
    return cross_entropy(logits, jnp.roll(ids, -1, axis=1))


def split_qkv(p):
    """The model-side change gpt2(qkv="split") asks for: c_attn (3n, n) -> (3, n, n)."""
    p = jax.tree.map(lambda a: a, p)
    for blk in p["transformer"]["h"].values():
        c = blk["attn"]["c_attn"]
        n = c["kernel"].shape[1]
        c["kernel"], c["bias"] = c["kernel"].reshape(3, n, n), c["bias"].reshape(3, n)
    return p


def bert_loss(p, ids):
    """Hugging Face's Flax BertForPreTraining: masked-LM logits from the tied word
    embeddings plus cls/predictions/bias, and the next-sentence head on the pooled token."""
    heads = CFG["bert"]["num_attention_heads"]
    e, d = p["bert"]["embeddings"], CFG["bert"]["hidden_size"]

    def dense(q, x):
        return x @ q["kernel"] + q["bias"]

    b, t = ids.shape
    x = e["word_embeddings"]["embedding"][ids] + e["position_embeddings"]["embedding"][:t]
    x = layer_norm(e["LayerNorm"], x + e["token_type_embeddings"]["embedding"][0])
    for i in sorted(p["bert"]["encoder"]["layer"], key=int):
        lp = p["bert"]["encoder"]["layer"][i]
        s = lp["attention"]["self"]
        q, k, v = (
            dense(s[n], x).reshape(b, t, heads, d // heads) for n in ("query", "key", "value")
        )
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, d)
        x = layer_norm(
            lp["attention"]["output"]["LayerNorm"], x + dense(lp["attention"]["output"]["dense"], o)
        )
        h = jax.nn.gelu(dense(lp["intermediate"]["dense"], x))
        x = layer_norm(lp["output"]["LayerNorm"], x + dense(lp["output"]["dense"], h))
    c = p["cls"]
    h = layer_norm(
        c["predictions"]["transform"]["LayerNorm"],
        jax.nn.gelu(dense(c["predictions"]["transform"]["dense"], x)),
    )
    logits = h @ e["word_embeddings"]["embedding"].T + c["predictions"]["bias"]
    pooled = jnp.tanh(dense(p["bert"]["pooler"]["dense"], x[:, 0]))
    nsp = dense(c["seq_relationship"], pooled)
    return cross_entropy(logits, ids) + cross_entropy(nsp, ids[:, 0] % 2)


def grads(loss_fn):
    return lambda p, ids: jax.value_and_grad(loss_fn)(p, ids)


def run(rules, loss_fn, p, ids, mesh, backward=True):
    """The tensor-parallel result, the single-device one, and the model-axis collectives."""
    fn = grads(loss_fn) if backward else loss_fn
    tp = tx.tensor_parallel(rules, mesh=mesh)(fn)
    found = hlo.collectives(tp.lower(p, ids).compile().as_text(), mesh)
    return tp(p, ids), jax.jit(fn)(p, ids), found


def assert_same(got, want):
    """Equal to float32 round-off: 1e-5 relative, or 1e-6 of the largest value (a gradient
    that is zero in exact arithmetic, such as BERT's key bias, is round-off on both sides)."""
    scale = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * scale)


def moves(found):
    """Collectives that move activations or weights between devices, not partial sums."""
    return [c for c in found if c.kind != "all-reduce"]


def activations(found, d):
    """How many (B, T, d) float32 activations the collectives carry."""
    return sum(shape == f"f32[{B},{T},{d}]" for c in found for shape in c.shapes)


def test_llama_gqa_rules_keep_kv_heads_whole(mesh):
    """2 KV heads, 8 query heads on model=4. Split, each device holds half a KV head:
    RoPE's rotate_half and repeat_kv make XLA move k and v between devices (permutes,
    all-to-alls, all-gathers). The GQA rules replicate k_proj/v_proj: the forward pass
    has Megatron's all-reduces only, and a step moves fewer bytes."""
    p, ids = init(HF["llama"]["flax"]), tokens(CFG["llama"]["vocab_size"])
    natural, aware = tx.rules.llama(), tx.rules.llama(num_key_value_heads=2, axis_size=4)
    got, want, split_step = run(natural, llama_loss, p, ids, mesh)
    assert_same(got, want)
    got, want, aware_step = run(aware, llama_loss, p, ids, mesh)
    assert_same(got, want)
    got, want, aware_fwd = run(aware, llama_loss, p, ids, mesh, backward=False)
    assert_same(got, want)
    assert {c.kind for c in moves(split_step)} >= {"collective-permute", "all-to-all"}
    assert moves(aware_fwd) == []
    assert activations(aware_fwd, 64) == 3  # after o_proj, after down_proj, the embedding
    # Backward, the replicated k/v projections' gradients are gathered (the reduction a
    # replicated weight needs), but nothing is permuted or exchanged all-to-all.
    assert {c.kind for c in moves(aware_step)} == {"all-gather"}
    assert sum(c.bytes for c in aware_step) < sum(c.bytes for c in split_step)


def test_llama_kv_heads_that_divide_are_split(mesh):
    """2 KV heads on model=2: one whole head per device, no data moved between devices."""
    mesh2 = tx.mesh(devices=jax.devices()[:2], model=2)
    p, ids = init(HF["llama"]["flax"]), tokens(CFG["llama"]["vocab_size"])
    rules = tx.rules.llama(num_key_value_heads=2, axis_size=2)
    assert rules.spec_for("model/layers/0/self_attn/k_proj/kernel") == P(None, AXIS)
    got, want, found = run(rules, llama_loss, p, ids, mesh2)
    assert_same(got, want)
    assert moves(found) == []


def test_gpt2_fused_c_attn_against_the_split_layout(mesh):
    """c_attn as stored: its column split cuts across q, k and v and XLA reshuffles them.
    Reshaped to (3, n, n) (qkv="split"): Megatron's minimum, 3 activations forward (both
    c_proj, the vocab-parallel embedding) and 3 backward."""
    p, ids = init(HF["gpt2"]["flax"]), tokens(CFG["gpt2"]["vocab_size"])
    got, want, fused = run(tx.rules.gpt2(), gpt2_loss, p, ids, mesh)
    assert_same(got, want)
    got, want, split = run(tx.rules.gpt2(qkv="split"), gpt2_loss, split_qkv(p), ids, mesh)
    assert_same(got, want)
    assert {c.kind for c in moves(fused)} >= {"collective-permute", "all-to-all"}
    assert moves(split) == []
    assert activations(split, 64) == 6
    assert sum(c.bytes for c in split) < sum(c.bytes for c in fused)


def test_bert_rules_match_one_device_with_megatron_communication(mesh):
    p, ids = init(HF["bert"]["flax"]), tokens(CFG["bert"]["vocab_size"])
    got, want, found = run(tx.rules.bert(), bert_loss, p, ids, mesh)
    assert_same(got, want)
    assert moves(found) == []
    # 3 forward; backward 5, not 3: the input-gradient partial sums of query, key and value
    # are all-reduced separately (one collective with 3 operands, issue #17 item 2).
    assert activations(found, 64) == 8


def test_rules_notes_and_axis_sizes_are_checked_and_kept():
    rules = tx.Rules((r".*", P()), notes="why", axis_sizes={AXIS: 2})
    assert rules.notes == ("why",) and rules.axis_sizes == {AXIS: 2}
    assert rules == tx.Rules((r".*", P()))  # notes and sizes change no spec
    assert (rules + rules).notes == ("why",)  # kept once
    for bad in (0, True, 2.0):
        with pytest.raises(
            tx.RuleError, match=rf"axis_sizes\['model'\] must be a positive int, got {bad}"
        ):
            tx.Rules(axis_sizes={AXIS: bad})
    # A mesh without the axis is not this check's business (the specs name the axis).
    assert rules.specs({"w": jnp.zeros(4)}, tx.mesh(data=8)) == {"w": P()}


def test_gpt2_real_vocabulary_says_how_to_fix_it(mesh):
    wte = {"transformer": {"wte": {"embedding": jax.ShapeDtypeStruct((50257, 8), jnp.float32)}}}
    with pytest.raises(
        tx.RuleError,
        match=r"(?s)transformer/wte/embedding  shape \(50257, 8\): dimension 0 \(size 50257\) is "
        r"not divisible by 'model'=4.*Notes of these rules:.*vocab_parallel=False",
    ):
        tx.rules.gpt2().specs(wte, mesh)
    assert flat_specs(tx.rules.gpt2(vocab_parallel=False), wte, mesh) == {
        "transformer/wte/embedding": P()
    }
    assert len(tx.rules.gpt2(qkv="split", vocab_parallel=False).notes) == 0
