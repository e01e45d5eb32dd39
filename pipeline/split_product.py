"""Split-product similarity, as DCR defines it (Somepalli et al., "Diffusion Art or Digital Forgery?",
CVPR 2023; code: github.com/somepago/DCR, ``diff_retrieval.py``).

For each image, the unpooled token features of a ViT (``(tokens, width)``; with DINO, every output
token after the final norm, class token first) are

1. flattened token by token into one vector of ``tokens * width`` numbers,
2. L2-normalised as a whole vector (DCR normalises the flattened features before splitting),
3. split into ``chunks`` equal consecutive pieces (DCR's ``rearrange('b (c p) -> b c p')``);

the similarity of two images is the largest inner product of corresponding pieces (chunk i of one
with chunk i of the other). The "cross" variant (DCR's ``splitlosscross``) takes the largest inner
product over every pair of pieces, so a copied patch that moved still meets itself.

Normalisation: the whole vector, once, before splitting, exactly as DCR does; the pieces are not
renormalised. Scores are therefore not cosines: the chunk products of two unit vectors sum to
their cosine, so a whole-image copy scores about ``1 / chunks`` per piece, and what the maximum
picks out is the piece where two images agree most. Thresholds for this score are calibrated on
the baseline like any other descriptor's, never taken from SSCD's 0.5. DCR's default number of
pieces is the number of tokens (its ``numpatches`` is set to the token count), one piece per
token: ``chunks=0`` here.
"""
from __future__ import annotations

import numpy as np


def flatten_unit(tokens: np.ndarray) -> np.ndarray:
    """(n, tokens, width) -> (n, tokens * width) float32, each row L2-normalised as a whole."""
    flat = np.asarray(tokens, dtype=np.float32).reshape(len(tokens), -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def resolve_chunks(chunks: int, tokens: int, width: int) -> int:
    """The number of pieces: ``chunks``, or one per token when 0; it must divide ``tokens * width``."""
    c = chunks or tokens
    if c < 1 or (tokens * width) % c:
        from pipeline.errors import ConfigError

        raise ConfigError(f"split-product chunks must divide tokens x width = {tokens} x {width} = "
                          f"{tokens * width}, got {c} (0 = one chunk per token, {tokens})")
    return c


def split_product(a: np.ndarray, b: np.ndarray, chunks: int = 0, cross: bool = False) -> np.ndarray:
    """(m, tokens, width) x (n, tokens, width) token features -> (m, n) split-product similarities."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"token features of different shapes: {a.shape[1:]} vs {b.shape[1:]}")
    m, n = len(a), len(b)
    if not m or not n:
        return np.zeros((m, n), np.float32)
    c = resolve_chunks(chunks, a.shape[1], a.shape[2])
    qa = flatten_unit(a).reshape(m, c, -1)
    qb = flatten_unit(b).reshape(n, c, -1)
    if cross:
        # every piece of a against every piece of b: (m, n, c, c)
        return np.einsum("mcp,ndp->mncd", qa, qb).reshape(m, n, -1).max(axis=2)
    return np.einsum("mcp,ncp->mnc", qa, qb).max(axis=2)
