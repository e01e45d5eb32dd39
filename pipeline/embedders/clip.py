"""open_clip image embedder: any architecture, weights from a pretrained tag or a checkpoint file."""
from __future__ import annotations

import json

from pipeline.config import EmbedderConfig
from pipeline.embedders.base import Embedder
from pipeline.embedders.torch_util import TorchImageEmbedder, checkpoint_file, pick_device
from pipeline.storage import Storage, read_bytes


def known_architectures() -> set[str]:
    import open_clip

    return set(open_clip.list_models())


def model_image_size(arch: str) -> int:
    """Input size from the architecture's config alone (no weights needed)."""
    import open_clip

    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def register_config(url: str, storage: Storage | None = None) -> str:
    """Register a custom open_clip model config (JSON with embed_dim/vision_cfg/text_cfg).

    The architecture name is the file's stem, as open_clip names its bundled configs.
    """
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    name = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")
    _MODEL_CONFIGS[name] = json.loads(read_bytes(url, storage))
    open_clip.list_models()  # keep open_clip's own listing consistent
    return name


class OpenClipEmbedder(TorchImageEmbedder, Embedder):
    name = "open_clip"

    def __init__(self, cfg: EmbedderConfig, storage: Storage | None = None):
        import open_clip

        if cfg.model_config:
            register_config(cfg.model_config, storage)
        self.device = pick_device(cfg.device)
        if cfg.checkpoint:
            pretrained, self.weights = checkpoint_file(cfg, storage)
        else:
            pretrained, self.weights = cfg.pretrained, f"tag:{cfg.pretrained}"
        # weights_only: a checkpoint is tensors; nothing read from storage is unpickled
        model, _, _ = open_clip.create_model_and_transforms(cfg.model, pretrained=pretrained, device=self.device,
                                                            weights_only=True)
        self.model = model.eval()
        self.arch = cfg.model
        visual = model.visual
        size = visual.image_size
        self.turn = cfg.exif_orientation
        self.image_size = cfg.image_size or (size[0] if isinstance(size, (tuple, list)) else int(size))
        self.mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self._probe_dim()

    def _network(self, x):
        return self.model.encode_image(x)

    def embed_texts(self, texts: list[str], batch_size: int = 256):
        """(n, dim) float32 L2-normalised embeddings of texts by the model's own text tower (prompt vs caption)."""
        import numpy as np
        import open_clip
        import torch

        from pipeline.embedders.base import l2_normalize

        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tokenizer = open_clip.get_tokenizer(self.arch)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tokens = tokenizer(list(texts[i:i + batch_size])).to(self.device)
                out.append(self.model.encode_text(tokens).float().cpu().numpy())
        return l2_normalize(np.concatenate(out))
