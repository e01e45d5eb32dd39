"""The dino embedder (a tiny timm ViT of the DINO family saved and loaded the way users load weights)
and DCR's split-product similarity against a brute-force reference."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import synthetic_images as synthetic
from pipeline.config import EmbedderConfig
from pipeline.errors import ConfigError
from pipeline.split_product import split_product

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}
ARCH = "vit_small_patch16_224.dino"


def tiny_dino(tmp_path, wrap=None, prefix="", fmt="pth"):
    """A small ViT of the DINO family: its timm kwargs as model_config JSON, its weights as a checkpoint."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **TINY).eval()
    cfg_path = tmp_path / "tiny-dino.json"
    cfg_path.write_text(json.dumps(TINY))
    state = {prefix + k: v for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        ckpt = tmp_path / "tiny.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    else:
        ckpt = tmp_path / "tiny.pth"
        torch.save({wrap: state} if wrap else state, ckpt)
    return cfg_path, ckpt, model


def reference_tokens(model, pixels, mean, std):
    import torch

    from pipeline.embedders.torch_util import to_normalized_tensor

    with torch.no_grad():
        return model.forward_features(to_normalized_tensor(pixels, mean, std, "cpu")).numpy()


@pytest.mark.parametrize("wrap,prefix,fmt", [(None, "", "pth"), ("teacher", "backbone.", "pth"),
                                             ("model", "module.", "pth"), (None, "", "safetensors")])
def test_dino_loads_the_saved_weights_in_every_checkpoint_form(tmp_path, wrap, prefix, fmt):
    from pipeline.embedders import build_embedder, build_preprocessor

    cfg_path, ckpt, model = tiny_dino(tmp_path, wrap, prefix, fmt)
    cfg = EmbedderConfig(name="dino", model=ARCH, checkpoint=str(ckpt), model_config=str(cfg_path), device="cpu")
    emb = build_embedder(cfg)
    images = [synthetic.scene(i, (80, 60)) for i in range(3)]
    pixels = np.stack([emb.preprocess(im) for im in images])
    assert pixels.shape == (3, 32, 32, 3)
    assert build_preprocessor(cfg)(images[0]).shape == (32, 32, 3)  # without loading weights
    want = reference_tokens(model, pixels, emb.mean, emb.std)
    tokens = emb.tokens(pixels)
    assert tokens.shape == (3, 1 + 16, 32)  # class token + a 4x4 grid of patches
    np.testing.assert_allclose(tokens, want, atol=1e-5)  # the saved weights, not a fresh init
    cls = want[:, 0] / np.linalg.norm(want[:, 0], axis=1, keepdims=True)
    np.testing.assert_allclose(emb.embed(pixels), cls, atol=1e-5)
    ident = emb.identity()
    assert ident["embedder"] == "dino" and ident["model"] == ARCH and ident["dim"] == 32
    assert ident["weights"].startswith("sha256:") and ident["model_config"] == TINY
    assert "resize_short=32" in ident["preprocess"] and "0.485" in ident["preprocess"]


def test_dino_refuses_what_it_cannot_load(tmp_path):
    import torch

    from pipeline.embedders import build_embedder, validate

    cfg_path, ckpt, _ = tiny_dino(tmp_path)
    with pytest.raises(ConfigError, match="needs embedder.checkpoint"):
        validate(EmbedderConfig(name="dino", model=ARCH))
    with pytest.raises(ConfigError, match="not a timm vision transformer"):
        validate(EmbedderConfig(name="dino", model="resnet50", checkpoint=str(ckpt)))
    # the weights of the tiny model do not fit the full-size architecture
    with pytest.raises(ConfigError, match="does not fit"):
        build_embedder(EmbedderConfig(name="dino", model=ARCH, checkpoint=str(ckpt), device="cpu"))
    bad = tmp_path / "bad.pth"
    torch.save({"epoch": 3}, bad)
    with pytest.raises(ConfigError, match="no state_dict"):
        build_embedder(EmbedderConfig(name="dino", model=ARCH, checkpoint=str(bad), model_config=str(cfg_path)))


def brute_split_product(a: np.ndarray, b: np.ndarray, chunks: int, cross: bool) -> np.ndarray:
    """DCR's definition written out with loops: flatten, normalise the whole vector, cut, compare pieces."""
    out = np.zeros((len(a), len(b)))
    for i, x in enumerate(a):
        fx = x.reshape(-1).astype(np.float64)
        fx /= np.linalg.norm(fx)
        for j, y in enumerate(b):
            fy = y.reshape(-1).astype(np.float64)
            fy /= np.linalg.norm(fy)
            size = len(fx) // chunks
            px = [fx[k * size:(k + 1) * size] for k in range(chunks)]
            py = [fy[k * size:(k + 1) * size] for k in range(chunks)]
            pairs = [(p, q) for p in range(chunks) for q in range(chunks)] if cross else [(k, k) for k in range(chunks)]
            out[i, j] = max(float(px[p] @ py[q]) for p, q in pairs)
    return out


@pytest.mark.parametrize("chunks", [0, 1, 2, 3, 12])
@pytest.mark.parametrize("cross", [False, True])
def test_split_product_matches_the_brute_force_definition(chunks, cross):
    rng = np.random.default_rng(chunks + 10 * cross)
    a, b = rng.normal(size=(3, 6, 4)), rng.normal(size=(5, 6, 4))
    got = split_product(a, b, chunks=chunks, cross=cross)
    want = brute_split_product(a, b, chunks or 6, cross)  # 0 = one chunk per token, as DCR
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if chunks == 1:  # one chunk is the plain cosine of the flattened features
        flat = lambda t: t.reshape(len(t), -1) / np.linalg.norm(t.reshape(len(t), -1), axis=1, keepdims=True)  # noqa: E731
        np.testing.assert_allclose(got, flat(a) @ flat(b).T, rtol=1e-5)


def test_split_product_finds_a_moved_patch_only_in_the_cross_variant():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 4, 8))
    moved = rng.normal(size=(1, 4, 8))
    moved[0, 3] = base[0, 0] * 10  # token 0 of base, dominant, at another position
    same = split_product(base, moved, chunks=0)[0, 0]
    cross = split_product(base, moved, chunks=0, cross=True)[0, 0]
    assert cross > same + 0.2
    with pytest.raises(ConfigError, match="must divide"):
        split_product(base, moved, chunks=5)


def test_second_stage_scores_each_descriptor_on_pixels(tmp_path):
    import torch

    from pipeline.second_stage import SecondStage, column_of

    cfg_path, ckpt, _ = tiny_dino(tmp_path)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 16)).eval()
    sscd_path = tmp_path / "sscd_like.torchscript.pt"
    torch.jit.save(torch.jit.script(net), str(sscd_path))
    configs = {"dino": EmbedderConfig(name="dino", model=ARCH, checkpoint=str(ckpt), model_config=str(cfg_path),
                                      device="cpu"),
               "sscd": EmbedderConfig(name="sscd", checkpoint=str(sscd_path), image_size=32, device="cpu")}
    stage = SecondStage(["dino-split", "sscd", "dino"], configs, chunks=0, cross=True)
    assert stage.primary.name == "dino-split" and column_of("dino-split") == "score_dino_split"
    assert stage.descriptors[0].embedder is stage.descriptors[2].embedder  # one DINO model for both
    query = synthetic.scene(1, (64, 48))
    cands = [synthetic.scene(1, (64, 48)), synthetic.scene(2, (64, 48)), synthetic.scene(3, (48, 64))]
    got = stage.scores(query, cands, regions=False)
    dino = stage.descriptors[0].embedder
    want_split = split_product(dino.token_images([query]), dino.token_images(cands), 0, cross=True)[0]
    np.testing.assert_allclose(got["dino-split"], want_split, rtol=1e-5)
    # the same picture: every token has the same norm after the final LayerNorm, so each of the 17
    # pieces holds 1/17 of the unit vector and the best pair is a piece with itself
    assert got["dino-split"][0] == pytest.approx(1 / 17, rel=1e-4)
    np.testing.assert_allclose(got["dino"], dino.embed_images(cands) @ dino.embed_images([query])[0], rtol=1e-5)
    assert got["sscd"][0] == pytest.approx(1.0, abs=1e-5)
    ident = {d["name"]: d for d in stage.identities()}
    assert ident["dino-split"]["identity"]["similarity"] == "split-product"
    assert ident["dino-split"]["identity"]["chunks"] == 0 and ident["dino-split"]["identity"]["cross"] is True
    assert ident["sscd"]["column"] == "score_sscd" and ident["sscd"]["identity"]["similarity"] == "cosine"
    with pytest.raises(ConfigError, match="unknown second-stage descriptor"):
        SecondStage(["dino-splitt"], configs)
