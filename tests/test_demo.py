"""The demo's corpus grown with filler images (what bench/search_stages.py uses for a 1M corpus)."""
from __future__ import annotations

import hashlib
import json
import tarfile

from pipeline.demo import PER_TAR, DemoConfig, add_filler
from pipeline.progress import NullProgress
from pipeline.verify import decode


def test_filler_tars_continue_after_the_scenes_with_distinct_images(tmp_path):
    cfg = DemoConfig(workdir=str(tmp_path), corpus_size=300, filler_size=PER_TAR + 10)
    add_filler(cfg, first_shard=2, progress=NullProgress())
    tars = sorted(p.name for p in (tmp_path / "corpus").iterdir())
    assert tars == ["00002.tar", "00003.tar"]
    keys, digests = [], set()
    for name in tars:
        with tarfile.open(tmp_path / "corpus" / name) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for member, data in members.items():
            key, ext = member.split(".")
            if ext == "jpg":
                image = decode(data)
                assert image.size == (320, 256)
                digests.add(hashlib.sha256(image.tobytes()).hexdigest())
                meta = json.loads(members[f"{key}.json"])
                assert meta["key"] == key and meta["caption"] == members[f"{key}.txt"].decode()
                keys.append(key)
    assert len(keys) == len(set(keys)) == cfg.filler_size
    assert all(k[:5] in ("00002", "00003") for k in keys)
    assert len(digests) == cfg.filler_size  # every filler image differs
