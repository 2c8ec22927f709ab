"""Tokenizers for the Llama example: bytes by default, or a local ``tokenizer.json``.

``load()`` is byte-level (vocabulary 256), so the example runs offline on the text that
ships with Python (`corpus_tokens`). ``load("path/to/tokenizer.json")`` (or the directory
holding it, e.g. a Hugging Face checkpoint) uses the ``tokenizers`` package; nothing is
downloaded. `check_vocab` is the start-up check that every token id fits the model.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

from titanax.errors import ConfigError


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Any) -> str: ...


class Bytes:
    """UTF-8 bytes as tokens: ids 0..255."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as int32 ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        """The text of byte ids (invalid UTF-8, e.g. a cut character, becomes U+FFFD)."""
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "Bytes(vocab_size=256)"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json``.

    ``vocab_size`` is one more than the largest id, added (special) tokens included, so
    that ids always index an embedding of that many rows. ``encode`` adds no special
    tokens (no BOS): the training text is one stream.
    """

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self.path = path
        try:
            self.tokenizer = _Tokenizer.from_file(path)
        except Exception as e:  # the Rust library's own exception type, not exported
            raise ConfigError(
                f"tokenizer {path}: not a tokenizer.json the tokenizers package reads: {e}"
            ) from None
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0

    def encode(self, text: str) -> np.ndarray:
        """The token ids of ``text``, int32."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Any) -> str:
        """The text of token ids (special tokens kept)."""
        return self.tokenizer.decode(
            np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=False
        )

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load(path: str | os.PathLike[str] | None = None) -> Bytes | HFTokenizer:
    """A tokenizer: ``None`` -> bytes; a ``tokenizer.json`` file, or a directory holding one.

    Raises:
      ConfigError: the path has no ``tokenizer.json``, or the file is not one.
    """
    if path is None:
        return Bytes()
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(
            f"tokenizer {path}: not found; give a local tokenizer.json (or its directory),"
            " or no tokenizer for bytes"
        )
    return HFTokenizer(path)


def corpus_text() -> str:
    """The embedded training text: the prose of Python's documentation topics."""
    from examples.gpt_small_tp.model import corpus

    return corpus().tobytes().decode("utf-8")


def corpus_tokens(tokenizer: Tokenizer) -> np.ndarray:
    """The embedded text (`corpus_text`) as int32 token ids of ``tokenizer``."""
    if isinstance(tokenizer, Bytes):  # the same bytes, without a decode and encode
        from examples.gpt_small_tp.model import corpus

        return corpus().astype(np.int32)
    return tokenizer.encode(corpus_text())


def check_vocab(tokenizer: Tokenizer, cfg: Any) -> None:
    """Every id of ``tokenizer`` must index the model's embedding (``cfg.vocab_size`` rows).

    A larger vocabulary would not fail: JAX clamps out-of-range gathers, so the extra
    tokens would silently share the last row. Hence this check at start-up.

    Raises:
      ConfigError: ``tokenizer.vocab_size > cfg.vocab_size``, with both numbers.
    """
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer {tokenizer!r} has {tokenizer.vocab_size} ids but the model's"
            f" vocab_size is {cfg.vocab_size}: set vocab_size >= {tokenizer.vocab_size} in the"
            " model config (or use the tokenizer that goes with the checkpoint)"
        )
