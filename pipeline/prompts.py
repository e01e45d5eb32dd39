"""A generation's prompt against its matched training image's caption.

Over-specific prompts, often a training caption verbatim, are one cause of memorisation (Somepalli
et al. 2023; Chen et al. 2024, AMG). For each match replica records

* ``prompt_caption_exact``: the prompt equals the caption after normalisation
  (:func:`pipeline.captions.normalize`: NFKC, casefold, URLs stripped, whitespace collapsed);
* ``prompt_caption_overlap``: the Jaccard index of their sets of word tokens (``\\w+`` runs of the
  normalised texts): 1 for the same words in any order, 0 for none in common;
* ``prompt_caption_clip``: the cosine of their CLIP text embeddings, when the run's embedder is an
  open_clip model (its own text tower; null otherwise).

Null where the generation has no prompt or the match no caption.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from pipeline.captions import has_caption, normalize

WORD = re.compile(r"\w+")


def words(text: str) -> set[str]:
    return set(WORD.findall(normalize(text)))


def exact_match(prompt: str | None, caption: str | None) -> bool | None:
    if not has_caption(prompt) or not has_caption(caption):
        return None
    return normalize(prompt) == normalize(caption)


def token_overlap(prompt: str | None, caption: str | None) -> float | None:
    """Jaccard index of the word sets of the normalised texts (None when either is missing)."""
    if not has_caption(prompt) or not has_caption(caption):
        return None
    a, b = words(prompt), words(caption)
    return len(a & b) / len(a | b) if a | b else 1.0


def text_similarity(embedder, prompts: Sequence[str | None], captions: Sequence[str | None]) -> list[float | None]:
    """Cosine of the text embeddings of each (prompt, caption) pair, with an embedder that has
    ``embed_texts`` (open_clip); None for pairs missing a text, all None without one."""
    pairs = [i for i, (p, c) in enumerate(zip(prompts, captions)) if has_caption(p) and has_caption(c)]
    out: list[float | None] = [None] * len(prompts)
    if not pairs or not hasattr(embedder, "embed_texts"):
        return out
    texts = sorted({t for i in pairs for t in (prompts[i], captions[i])})
    vecs = dict(zip(texts, embedder.embed_texts(texts)))
    for i in pairs:
        out[i] = float(np.dot(vecs[prompts[i]], vecs[captions[i]]))
    return out
