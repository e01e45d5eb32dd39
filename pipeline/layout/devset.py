"""The development benchmark's cache folder (pipeline/devset.py): packages fetched once.

```
{cache}/debs/{package}_{version}_{arch}.deb   as apt-get download names them
{cache}/unpacked/{package}/                   dpkg-deb -x of that package
{cache}/verify/{run}-{method}-{settings}.pkl  bench/copy_detection.py's verified pairs, per run
                                              (split, edits, limit, -d{N} corpus distractors),
                                              keypoint method and verifier settings digest
```

The committed manifest of the images used is ``bench/devset.sha256`` (``MANIFEST``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The committed list of every image the benchmark and the default descriptor's fit use.
MANIFEST = Path(__file__).resolve().parents[2] / "bench" / "devset.sha256"


@dataclass
class DevsetCache:
    root: Path

    def debs(self) -> Path:
        return self.root / "debs"

    def unpacked(self, package: str) -> Path:
        return self.root / "unpacked" / package

    def verified_pairs(self, run: str, method: str, settings: str) -> Path:
        return self.root / "verify" / f"{run}-{method}-{settings}.pkl"
