"""A prompt against its match's caption: normalised equality, word overlap, CLIP text similarity."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.prompts import exact_match, text_similarity, token_overlap


def test_exact_match_and_overlap():
    assert exact_match("The Scream by  Munch", "the scream by munch https://x.org/a.jpg") is True
    assert exact_match("the scream", "the scream by munch") is False
    assert exact_match(None, "a caption") is None and exact_match("a prompt", "  ") is None
    assert token_overlap("a red car", "A RED CAR") == 1.0
    assert token_overlap("red car on a beach", "a red car") == pytest.approx(3 / 5)
    assert token_overlap("dog", "cat") == 0.0 and token_overlap("", "cat") is None


def test_clip_text_similarity_with_the_runs_open_clip_model(tmp_path):
    import open_clip
    import torch

    from pipeline.config import EmbedderConfig
    from pipeline.embedders import build_embedder

    # a tiny open_clip model whose text tower takes open_clip's own tokenizer (its full vocabulary)
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                              "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}
    cfg_path = tmp_path / "replica-tiny-text.json"
    cfg_path.write_text(json.dumps(config))
    from pipeline.embedders.clip import register_config

    register_config(str(cfg_path))
    torch.manual_seed(0)
    model = open_clip.create_model("replica-tiny-text").eval()
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    emb = build_embedder(EmbedderConfig(name="open_clip", model="replica-tiny-text", checkpoint=str(ckpt),
                                        model_config=str(cfg_path), device="cpu"))
    prompts = ["a red car", "a red car", None, "a dog"]
    captions = ["a red car", "a portrait of a woman", "x", None]
    got = text_similarity(emb, prompts, captions)
    with torch.no_grad():
        tok = open_clip.get_tokenizer("replica-tiny-text")
        v = model.encode_text(tok(["a red car", "a portrait of a woman"])).numpy()
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert got[0] == pytest.approx(1.0, abs=1e-5)
    assert got[1] == pytest.approx(float(v[0] @ v[1]), abs=1e-5)
    assert got[2] is None and got[3] is None
    assert text_similarity(object(), prompts, captions) == [None] * 4  # no text tower: nothing
