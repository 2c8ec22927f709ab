"""Hugging Face Llama checkpoints: import into examples/llama, shard on load, export back.

A tiny random checkpoint is written here with ``safetensors`` in Hugging Face's layout, and
the example's logits are checked against a reference forward pass written below in numpy
from Hugging Face's ``LlamaForCausalLM`` (rotate_half RoPE, repeat_kv, RMSNorm, SwiGLU),
independently of examples/llama/model.py and hf.py.
"""

import json
import os
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

import titanax as tx
from examples.llama import hf, model, tokens
from titanax.checkpoint import safetensors as st
from titanax.errors import CheckpointError, ConfigError

GQA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per key/value head
    rms_norm_eps=1e-6,
    rope_theta=500.0,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
TIED = {**GQA, "num_key_value_heads": 1, "tie_word_embeddings": True}  # MQA, no lm_head


def hf_tensors(c, seed=0, dtype=np.float32):
    """Random tensors with Hugging Face's names and (d_out, d_in) shapes. q/k are large
    enough that attention is far from uniform, so a wrong RoPE layout shows in the logits."""
    rng = np.random.default_rng(seed)
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def normal(scale, *shape):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    t = {"model.embed_tokens.weight": normal(0.5, v, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = normal(0.4, q, d)
        t[p + "self_attn.k_proj.weight"] = normal(0.4, kv, d)
        t[p + "self_attn.v_proj.weight"] = normal(0.2, kv, d)
        t[p + "self_attn.o_proj.weight"] = normal(0.2, d, q)
        t[p + "mlp.gate_proj.weight"] = normal(0.2, f, d)
        t[p + "mlp.up_proj.weight"] = normal(0.2, f, d)
        t[p + "mlp.down_proj.weight"] = normal(0.2, d, f)
        t[p + "input_layernorm.weight"] = (1 + normal(0.1, d)).astype(dtype)
        t[p + "post_attention_layernorm.weight"] = (1 + normal(0.1, d)).astype(dtype)
    t["model.norm.weight"] = (1 + normal(0.1, d)).astype(dtype)
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = normal(0.2, v, d)
    return t


def write_checkpoint(directory, c, tensors, *, files=1, **config_overrides):
    """config.json and model.safetensors, or `files` shards with an index, as HF writes them."""
    os.makedirs(directory, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "rope_scaling": None,
        "torch_dtype": "float32",
        **c,
        **config_overrides,
    }
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(config, fh)
    if files == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return directory
    names, weight_map = list(tensors), {}
    for k in range(files):
        file = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::files]}
        save_file(part, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, fh)
    return directory


def reference_logits(t, c, ids):
    """Hugging Face's LlamaForCausalLM forward, in float64 numpy, on the HF tensors."""
    h, kv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    hd = c["hidden_size"] // h
    b, n = ids.shape
    w = {k: v.astype(np.float64) for k, v in t.items()}

    def rms_norm(x, weight):
        return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))

    def rotate_half(x):
        return np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], axis=-1)

    inv_freq = 1.0 / c["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    freqs = np.arange(n)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)  # (T, hd)
    cos, sin = np.cos(emb), np.sin(emb)
    causal = np.tril(np.ones((n, n), bool))

    x = w["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = {
            k.split(f"model.layers.{i}.", 1)[1]: v
            for k, v in w.items()
            if k.startswith(f"model.layers.{i}.")
        }
        y = rms_norm(x, p["input_layernorm.weight"])

        def heads(y, weight, count):  # (B, T, D) -> (B, heads, T, hd)
            return (y @ weight.T).reshape(b, n, count, hd).transpose(0, 2, 1, 3)

        q = heads(y, p["self_attn.q_proj.weight"], h)
        k = heads(y, p["self_attn.k_proj.weight"], kv)
        v = heads(y, p["self_attn.v_proj.weight"], kv)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)  # repeat_kv
        scores = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, h * hd)
        x = x + attn @ p["self_attn.o_proj.weight"].T
        y = rms_norm(x, p["post_attention_layernorm.weight"])
        gate = y @ p["mlp.gate_proj.weight"].T
        x = (
            x
            + ((gate / (1 + np.exp(-gate))) * (y @ p["mlp.up_proj.weight"].T))
            @ p["mlp.down_proj.weight"].T
        )
    x = rms_norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def ids(c, seed=1):
    return np.random.default_rng(seed).integers(0, c["vocab_size"], size=(2, 16)).astype(np.int32)


def relative_error(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def bits(a):
    """The raw bits of an array (bit-exact comparison: -0.0 != 0.0, NaN payloads)."""
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def assert_same_tensors(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert np.array_equal(bits(got[name]), bits(want[name])), name


@pytest.mark.parametrize("c", [GQA, TIED], ids=["gqa", "tied-mqa"])
def test_logits_equal_hugging_face_reference(tmp_path, c, monkeypatch):
    t = hf_tensors(c)
    directory = write_checkpoint(tmp_path / "ckpt", c, t)
    cfg = hf.read_config(directory)
    assert cfg == model.LlamaConfig(**c)
    start = time.perf_counter()
    params = hf.load_params(directory, cfg)
    print(f"load time of the tiny checkpoint: {time.perf_counter() - start:.3f} s")
    assert ("lm_head" in params) != c["tie_word_embeddings"]
    want = reference_logits(t, c, ids(c))
    err = relative_error(model.forward(params, ids(c), cfg), want)
    print(
        f"{c['num_key_value_heads']} kv heads, tied={c['tie_word_embeddings']}: max |logit diff| / max |logit| = {err:.2e}"
    )
    assert err < 1e-5

    # The same check without the inverse RoPE permutation of q/k fails: it is what the check sees.
    monkeypatch.setattr(hf, "_UNDO_ROPE_PERMUTATION", False)
    unpermuted = hf.load_params(directory, cfg)
    err_unpermuted = relative_error(model.forward(unpermuted, ids(c), cfg), want)
    print(f"  without the q/k permutation: {err_unpermuted:.2e}")
    assert err_unpermuted > 1e-2


def megatron_shardings(mesh):
    """Megatron TP on `model` plus splits on `data` (hidden, layers) that cut across heads
    and layers, so shards need partial-head and per-layer reads."""
    specs = {
        "model": {
            "embed_tokens": {"embedding": P("model", "data")},
            "layers": {
                "input_layernorm": {"weight": P()},
                "self_attn": {
                    "q_proj": {"kernel": P(None, "data", "model")},
                    "k_proj": {"kernel": P(None, None, "model")},  # 2 KV heads on 4: half heads
                    "v_proj": {"kernel": P(None, None, "model")},
                    "o_proj": {"kernel": P(None, "model", None)},
                },
                "post_attention_layernorm": {"weight": P("data", None)},
                "mlp": {
                    "gate_proj": {"kernel": P(None, None, "model")},
                    "up_proj": {"kernel": P(None, None, "model")},
                    "down_proj": {"kernel": P("data", "model", None)},
                },
            },
            "norm": {"weight": P()},
        },
        "lm_head": {"kernel": P(None, "model")},
    }
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def test_sharded_load_reads_only_each_devices_shard(tmp_path, monkeypatch):
    t = hf_tensors(GQA)
    directory = write_checkpoint(tmp_path / "ckpt", GQA, t, files=3)  # sharded files + index
    cfg = hf.read_config(directory)
    whole = hf.load_params(directory, cfg)
    shardings = megatron_shardings(tx.mesh(data=2, model=4))

    reader = st.Reader(directory)
    per_leaf, real = [], jax.make_array_from_callback

    def spy(shape, sharding, callback, *args, **kwargs):  # elements each device's read took
        calls = []
        per_leaf.append(calls)

        def counted(index):
            before = reader.elements_read
            out = callback(index)
            calls.append((index, reader.elements_read - before))
            return out

        return real(shape, sharding, counted, *args, **kwargs)

    monkeypatch.setattr(jax, "make_array_from_callback", spy)
    sharded = hf.load_params(reader, cfg, shardings)

    leaves = jax.tree_util.tree_leaves_with_path(sharded)
    assert len(leaves) == len(per_leaf) == len(jax.tree.leaves(shardings))
    for (path, got), want, sharding, calls in zip(
        leaves, jax.tree.leaves(whole), jax.tree.leaves(shardings), per_leaf
    ):
        name = jax.tree_util.keystr(path)
        assert got.sharding == sharding, name
        assert np.array_equal(np.asarray(got), np.asarray(want)), name
        box = sharding.shard_shape(got.shape)
        reads = [n for _, n in calls]
        # every device's read is exactly its shard, or nothing (a replica already read)
        assert all(n in (0, int(np.prod(box))) for n in reads), (name, reads, box)
        assert sum(reads) == got.size, name  # each element read once on this process
        if not sharding.is_fully_replicated:
            assert len(calls) == 8 and max(reads) < got.size, name
    q = [
        n
        for (p, _), calls in zip(leaves, per_leaf)
        if "q_proj" in jax.tree_util.keystr(p)
        for _, n in calls
    ]
    k = [
        n
        for (p, _), calls in zip(leaves, per_leaf)
        if "k_proj" in jax.tree_util.keystr(p)
        for _, n in calls
    ]
    print(
        f"q_proj kernel {whole['model']['layers']['self_attn']['q_proj']['kernel'].size} elements: read per device {q}"
    )
    print(
        f"k_proj kernel {whole['model']['layers']['self_attn']['k_proj']['kernel'].size} elements: read per device {k}"
    )
    print(
        f"elements read in all: {reader.elements_read} = the checkpoint's {sum(a.size for a in t.values())}"
    )
    assert reader.elements_read == sum(a.size for a in t.values())


def test_sharded_load_with_the_llama_rule_set(tmp_path):
    """The shardings come from tx.rules.llama applied to the lazy tree (leaves have shapes)."""
    directory = write_checkpoint(tmp_path / "ckpt", GQA, hf_tensors(GQA))
    cfg = hf.read_config(directory)
    mesh = tx.mesh(data=2, model=4)
    rules = tx.rules.llama(stacked=True, num_key_value_heads=cfg.kv_heads, axis_size=4)
    specs = rules.specs(hf.lazy_params(st.Reader(directory), cfg), mesh)
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P)
    )
    sharded = hf.load_params(directory, cfg, shardings)
    whole = hf.load_params(directory, cfg)
    q = sharded["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, None, "model")
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(whole)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_import_export_round_trips_bit_exactly(tmp_path, dtype):
    for c in (GQA, TIED):
        t = hf_tensors(c, seed=3, dtype=dtype)
        t["model.layers.0.mlp.up_proj.weight"][0, :3] = [-0.0, np.inf, np.nan]  # bits, not values
        directory = write_checkpoint(tmp_path / f"in-{c['num_key_value_heads']}", c, t)
        cfg = hf.read_config(directory)
        params = hf.load_params(directory, cfg)
        assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(dtype)}

        out = tmp_path / f"out-{c['num_key_value_heads']}"
        written = hf.save_params(params, cfg, out)
        assert sorted(os.path.basename(p) for p in written) == ["config.json", "model.safetensors"]
        assert_same_tensors(load_file(out / "model.safetensors"), t)
        assert hf.read_config(out) == cfg
        again = hf.load_params(out, cfg)
        for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
            assert a.dtype == b.dtype and np.array_equal(bits(a), bits(b))

        # from parameters sharded on a mesh, into several files with an index
        mesh = tx.mesh(data=2, model=4)
        shardings = megatron_shardings(mesh) if c is GQA else NamedSharding(mesh, P())
        sharded = hf.load_params(directory, cfg, shardings)
        out_sharded = tmp_path / f"out-sharded-{c['num_key_value_heads']}"
        written = hf.save_params(sharded, cfg, out_sharded, max_shard_bytes=8_000)
        assert "model.safetensors.index.json" in {os.path.basename(p) for p in written}
        files = [p for p in written if p.endswith(".safetensors")]
        assert len(files) > 2
        for p in files:  # at most 8 kB of tensors, or one tensor larger than that
            sizes = [a.nbytes for a in load_file(p).values()]
            assert sum(sizes) <= 8_000 or len(sizes) == 1, (p, sizes)
        reread = st.Reader(out_sharded)
        assert_same_tensors({n: reread.tensor(n)[...] for n in reread.names}, t)


def test_export_from_bf16_parameters_with_dtype(tmp_path):
    """dtype= converts on the way in and out: bf16 file -> float32 master weights -> bf16 file."""
    t = hf_tensors(GQA, seed=4, dtype=ml_dtypes.bfloat16)
    directory = write_checkpoint(tmp_path / "in", GQA, t)
    cfg = hf.read_config(directory)
    params = hf.load_params(directory, cfg, dtype=np.float32)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    hf.save_params(params, cfg, tmp_path / "out", dtype=ml_dtypes.bfloat16)
    assert_same_tensors(load_file(tmp_path / "out" / "model.safetensors"), t)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_mismatched_tensors_are_one_error_naming_each_and_its_file(tmp_path):
    t = hf_tensors(GQA)
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.self_attn.k_proj.weight"] = t[
        "model.layers.0.self_attn.q_proj.weight"
    ]  # MHA-sized
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)  # ignored
    directory = write_checkpoint(tmp_path / "bad", GQA, t)
    with pytest.raises(CheckpointError, match="3 tensors do not fit the config") as e:
        hf.load_params(directory, hf.read_config(directory))
    msg = str(e.value)
    print(msg)
    assert (
        "missing: model.layers.1.mlp.up_proj.weight (48, 32) = (intermediate_size, hidden_size)"
        in msg
    )
    assert (
        "wrong shape: model.layers.0.self_attn.k_proj.weight in model.safetensors is (32, 32),"
        " the config gives (16, 32) = (num_key_value_heads x head_dim, hidden_size)" in msg
    )
    assert "unexpected: model.layers.0.self_attn.q_proj.bias in model.safetensors" in msg
    assert "inv_freq" not in msg


def test_untied_checkpoint_without_lm_head_says_tie_word_embeddings(tmp_path):
    t = hf_tensors(GQA)
    del t["lm_head.weight"]
    directory = write_checkpoint(tmp_path / "c", GQA, t)
    with pytest.raises(
        CheckpointError, match=r"missing: lm_head.weight(.|\n)*tie_word_embeddings=true"
    ):
        hf.load_params(directory, hf.read_config(directory))


def test_tied_checkpoint_that_also_stores_lm_head_loads(tmp_path):
    t = hf_tensors(TIED)
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()  # some exports keep the copy
    directory = write_checkpoint(tmp_path / "c", TIED, t)
    params = hf.load_params(directory, hf.read_config(directory))
    assert "lm_head" not in params


def test_shardings_not_shaped_like_the_parameters(tmp_path):
    directory = write_checkpoint(tmp_path / "c", GQA, hf_tensors(GQA))
    mesh = tx.mesh(data=2, model=4)
    shardings = megatron_shardings(mesh)
    del shardings["lm_head"]
    with pytest.raises(CheckpointError, match="shardings must be shaped like the parameters"):
        hf.load_params(directory, hf.read_config(directory), shardings)
    shardings = megatron_shardings(mesh)
    shardings["model"]["norm"]["weight"] = NamedSharding(mesh, P("model"))  # 32 on 4: fine
    shardings["model"]["embed_tokens"]["embedding"] = NamedSharding(
        mesh, P(None, ("data", "model"))
    )
    hf.load_params(directory, hf.read_config(directory), shardings)  # both divide: loads


def test_save_checks_the_parameters_against_the_config(tmp_path):
    cfg = model.LlamaConfig(**GQA)
    params = model.init(jax.random.key(0), cfg)
    params["model"]["layers"]["mlp"]["up_proj"]["kernel"] = params["model"]["layers"]["mlp"][
        "up_proj"
    ]["kernel"][:, :, :8]
    del params["model"]["norm"]
    with pytest.raises(CheckpointError, match="2 leaves do not fit the config") as e:
        hf.save_params(params, cfg, tmp_path / "out")
    assert (
        "wrong shape: ('model', 'layers', 'mlp', 'up_proj', 'kernel') is (2, 32, 8), the config gives (2, 32, 48)"
        in str(e.value)
    )
    assert "missing: ('model', 'norm', 'weight') (32,)" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, field",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
            "rope_parameters.rope_type",
        ),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"sliding_window": 16}, "sliding_window"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"num_key_value_heads": 3}, "num_attention_heads=4 must be a multiple"),
    ],
)
def test_unsupported_config_is_a_config_error_naming_field_and_file(tmp_path, override, field):
    directory = write_checkpoint(tmp_path / "c", GQA, {"x": np.zeros(1, np.float32)}, **override)
    with pytest.raises(ConfigError, match=f"config.json: {field}") as e:
        hf.read_config(directory)
    assert str(tmp_path) in str(e.value)


def test_accepted_config_variants(tmp_path):
    """Mistral, a window no shorter than the context, default rope_scaling, transformers 5's
    rope_parameters: all plain Llama."""
    directory = write_checkpoint(
        tmp_path / "c",
        GQA,
        {},
        architectures=["MistralForCausalLM"],
        sliding_window=None,
        rope_scaling={"rope_type": "default"},
        rope_parameters={"rope_type": "default", "rope_theta": 123.0},
    )
    assert hf.read_config(directory) == model.LlamaConfig(**{**GQA, "rope_theta": 123.0})
    # a field left out takes transformers' default (save_pretrained writes only the others)
    small = {k: v for k, v in GQA.items() if k not in ("rms_norm_eps", "max_position_embeddings")}
    write_checkpoint(tmp_path / "d", small, {}, architectures=["MistralForCausalLM"])
    with pytest.raises(ConfigError, match="sliding_window=4096 is not implemented"):
        hf.read_config(tmp_path / "d")  # Mistral's default window (4096) < its context
    write_checkpoint(tmp_path / "l", small, {})
    cfg = hf.read_config(tmp_path / "l")
    assert (cfg.rms_norm_eps, cfg.max_position_embeddings) == (1e-6, 2048)


# ---- tokens ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
    """A byte-level BPE of 320 ids trained in memory on part of the embedded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator([tokens.corpus_text()[:100_000]], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_tokenizer_json_encodes_decodes_and_checks_the_vocabulary(bpe_json):
    tok = tokens.load(bpe_json)
    assert tokens.load(bpe_json.parent).vocab_size == tok.vocab_size == 320  # file or directory
    text = "The for statement iterates over a sequence: naïve ✓ <|endoftext|>"
    ids_ = tok.encode(text)
    assert ids_.dtype == np.int32 and tok.decode(ids_) == text
    corpus = tokens.corpus_tokens(tok)
    n_bytes = len(tokens.corpus_text().encode("utf-8"))
    print(f"BPE-320: {len(corpus)} tokens for {n_bytes} bytes")
    assert corpus.dtype == np.int32 and 0 <= corpus.min() and corpus.max() < 320
    assert len(corpus) < 0.8 * n_bytes  # merges were learned and are used
    tokens.check_vocab(tok, model.LlamaConfig(vocab_size=320))
    with pytest.raises(ConfigError, match="has 320 ids but the model's vocab_size is 256"):
        tokens.check_vocab(tok, model.LlamaConfig(vocab_size=256))


def test_bytes_are_the_default_tokenizer():
    tok = tokens.load()
    assert tok.vocab_size == 256
    text = "naïve ✓"
    assert (
        tok.encode(text).tolist() == list(text.encode("utf-8"))
        and tok.decode(tok.encode(text)) == text
    )
    corpus = tokens.corpus_tokens(tok)
    assert corpus.dtype == np.int32
    assert bytes(corpus.astype(np.uint8)) == tokens.corpus_text().encode("utf-8")
    tokens.check_vocab(tok, model.LlamaConfig())


def test_missing_or_broken_tokenizer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        tokens.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a tokenizer.json"):
        tokens.load(tmp_path)
