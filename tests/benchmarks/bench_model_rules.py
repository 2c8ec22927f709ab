"""Communication of the Hugging Face rule sets (``tx.rules.llama/gpt2/bert``), read from
the compiled HLO: per-step collectives along ``model`` (kind, count, bytes per device)
for the layouts docs/tensor_parallel.md compares, with the Megatron minimum.

The models are the pure-JAX forward passes of tests/unit/test_model_rules.py (Hugging
Face's Flax names, RoPE with rotate_half and repeat_kv as Hugging Face writes them), one
layer, d_model 64, on ``model=4`` of 8 simulated CPU devices, batch 16 x 32 tokens. Every
result is also checked against the single-device one.

    python tests/benchmarks/bench_model_rules.py
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = (16, 32)  # GPT-2 and BERT here have 32 positions


def main() -> None:
    os.environ.setdefault("NPROC", "32")
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 8)
    sys.path.insert(0, ROOT)
    import titanax as tx
    from tests.unit import test_model_rules as m
    from titanax._util import format_bytes, table

    mesh = tx.mesh(devices=jax.devices()[:4], model=4)
    b, t = SHAPE
    m.B, m.T = b, t  # the models read the batch shape from the tokens; tokens() from these
    activation = b * t * 64 * 4
    llama, gpt2, bert = (m.init(m.HF[k]["flax"]) for k in ("llama", "gpt2", "bert"))
    cases = [
        ("llama kv=2: k/v split (tx.rules.llama())", tx.rules.llama(), m.llama_loss, llama),
        (
            "llama kv=2: k/v replicated (num_key_value_heads=2, axis_size=4)",
            tx.rules.llama(num_key_value_heads=2, axis_size=4),
            m.llama_loss,
            llama,
        ),
        ("gpt2 qkv='fused' (c_attn as stored)", tx.rules.gpt2(), m.gpt2_loss, gpt2),
        (
            "gpt2 qkv='split' (c_attn as (3, n, n))",
            tx.rules.gpt2(qkv="split"),
            m.gpt2_loss,
            m.split_qkv(gpt2),
        ),
        ("bert", tx.rules.bert(), m.bert_loss, bert),
    ]
    rows = []
    for name, rules, loss, params in cases:
        ids = m.tokens(128, shape=SHAPE)
        for what, backward in (("forward", False), ("step", True)):
            got, want, found = m.run(rules, loss, params, ids, mesh, backward)
            m.assert_same(got, want)
            kinds: dict[str, int] = {}
            for c in found:
                kinds[c.kind] = kinds.get(c.kind, 0) + 1
            rows.append(
                (
                    name,
                    what,
                    ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
                    format_bytes(sum(c.bytes for c in found)),
                    format_bytes(sum(c.bytes for c in m.moves(found))),
                )
            )
    print(
        table(
            ("rules", "program", "collectives (model axis)", "bytes/device", "of which moves"), rows
        )
    )
    print(
        f"Megatron minimum: 3 activations of {format_bytes(activation)} forward (after the "
        "attention and MLP blocks, the vocab-parallel embedding), 3 more backward, plus the "
        "loss's (batch, seq) reductions."
    )


if __name__ == "__main__":
    main()
