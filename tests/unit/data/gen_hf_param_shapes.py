"""Writes hf_param_shapes.json: the parameter names and shapes of Hugging Face's own
Llama, Mistral, GPT-2 and BERT, Flax and PyTorch, for tests/unit/test_model_rules.py.

Not part of the test run (transformers is not a Titanax dependency). Run it with
transformers 4.x (Flax models exist only there), jax and torch installed:

    uv venv /tmp/hfvenv --python 3.11
    uv pip install --python /tmp/hfvenv/bin/python jax==0.10.2 flax==0.12.8 "transformers<5" torch
    /tmp/hfvenv/bin/python tests/unit/data/gen_hf_param_shapes.py

Nothing is downloaded: the models are built from small random configs, Flax with
``jax.eval_shape`` of ``init_weights``, PyTorch on the ``meta`` device (its ``state_dict()``
keys are the names in ``model.safetensors``).
"""

import json
import os
import re

import jax
import torch
import transformers as T
from flax.traverse_util import flatten_dict


def flax_shapes(cls, cfg):
    model = cls(cfg, _do_init=False)
    shapes = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), (1, 8)))
    return {"/".join(k): list(v.shape) for k, v in sorted(flatten_dict(shapes).items())}


def torch_shapes(cls, cfg):
    with torch.device("meta"):
        model = cls(cfg)
    return {k: list(v.shape) for k, v in sorted(model.state_dict().items())}


CONFIGS = {
    "llama": (
        T.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
        ),
        T.FlaxLlamaForCausalLM,
        T.LlamaForCausalLM,
    ),
    "mistral": (
        T.MistralConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
        ),
        T.FlaxMistralForCausalLM,
        T.MistralForCausalLM,
    ),
    "gpt2": (
        T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32),
        T.FlaxGPT2LMHeadModel,
        T.GPT2LMHeadModel,
    ),
    "bert": (
        T.BertConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=32,
        ),
        T.FlaxBertForPreTraining,
        T.BertForPreTraining,
    ),
}

out = {
    "_source": f"tests/unit/data/gen_hf_param_shapes.py with transformers {T.__version__}, "
    f"jax {jax.__version__}, torch {torch.__version__}",
    "config": {name: cfg.to_diff_dict() for name, (cfg, _, _) in CONFIGS.items()},
}
for name, (cfg, flax_cls, torch_cls) in CONFIGS.items():
    out[name] = {"flax": flax_shapes(flax_cls, cfg), "torch": torch_shapes(torch_cls, cfg)}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_param_shapes.json")
text = json.dumps(out, indent=1, sort_keys=True)
text = re.sub(
    r"\[\s*([\d,\s]*?)\s*\]", lambda m: "[" + ", ".join(m[1].split()).replace(",,", ",") + "]", text
)
with open(path, "w") as f:
    f.write(text + "\n")
