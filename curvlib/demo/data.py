"""Offline data for the demos: English text from CPython's own docs, and scikit-learn's digits.

Nothing is downloaded. The text corpus is ``pydoc_data.topics`` — the
documentation topics that ``help()`` shows, shipped with every CPython (about
465k characters of English prose and code). The classifier data is
``sklearn.datasets.load_digits`` (1,797 8x8 images, bundled with scikit-learn).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# printable ASCII plus newline; anything else maps to "?"
_CHARS = "\n" + "".join(chr(i) for i in range(32, 127))
_INDEX = {ch: i for i, ch in enumerate(_CHARS)}
_UNKNOWN = _INDEX["?"]


class CharCorpus(NamedTuple):
    """A character-level corpus.

    Attributes:
      train: ``int32`` token ids of the training split.
      held_out: ``int32`` token ids of the held-out split (the last ``held_out_fraction``).
      vocab: the characters, ``vocab[i]`` is token ``i``.
    """

    train: np.ndarray
    held_out: np.ndarray
    vocab: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def python_docs_text() -> str:
    """The English documentation topics of the running CPython, in a fixed (sorted) order."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[name] for name in sorted(topics.topics))


def encode(text: str) -> np.ndarray:
    """Characters to token ids (``int32``); characters outside printable ASCII become ``?``."""
    return np.fromiter((_INDEX.get(ch, _UNKNOWN) for ch in text), dtype=np.int32, count=len(text))


def decode(ids) -> str:
    return "".join(_CHARS[int(i)] for i in np.asarray(ids).reshape(-1))


def load_corpus(held_out_fraction: float = 0.1, max_chars: int | None = None) -> CharCorpus:
    """The Python documentation as a character corpus (train / held-out split, no shuffling)."""
    text = python_docs_text()
    if max_chars is not None:
        text = text[:max_chars]
    ids = encode(text)
    cut = int(len(ids) * (1.0 - held_out_fraction))
    return CharCorpus(ids[:cut], ids[cut:], _CHARS)


def sequence_samples(tokens: np.ndarray, num: int, length: int, seed: int) -> np.ndarray:
    """``num`` non-overlapping windows of ``length + 1`` tokens, in a seeded random order.

    These are the ordered samples ``data`` of [`curvlib.landscape`][curvlib.landscape]: sample ``i``
    is one token sequence (inputs ``[:-1]``, targets ``[1:]``), and ``L_k`` is the
    mean token loss over the first ``k`` of them.
    """
    span = length + 1
    starts = np.arange(0, len(tokens) - span + 1, span)
    if num > len(starts):
        raise ValueError(
            f"asked for {num} windows of {span} tokens but the text holds only {len(starts)}."
        )
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(starts)[:num]
    return np.stack([tokens[s : s + span] for s in chosen]).astype(np.int32)


class Digits(NamedTuple):
    """scikit-learn's digits, standardised, as float32 features and int32 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """The bundled 8x8 digits (no download), pixel values scaled to [0, 1], seeded split."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(y))
    cut = int(len(y) * (1.0 - test_fraction))
    tr, te = perm[:cut], perm[cut:]
    return Digits(x[tr], y[tr], x[te], y[te])
