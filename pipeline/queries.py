"""Loading generated images (the queries) and the key lists search filters by.

Queries come from a folder of images (prompt in ``{stem}.txt``), WebDataset tars (prompt in
``{key}.txt``), or a Parquet file with a ``key`` column, an ``image`` (bytes) or ``path``
column, and an optional ``prompt`` column.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from pipeline.embedders.base import to_rgb
from pipeline.errors import ConfigError
from pipeline.storage import Storage, expand_inputs, filesystem, read_bytes, unstrip

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Query:
    key: str
    image: Image.Image
    prompt: str | None
    source: str


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    rgb = to_rgb(image)
    return rgb.copy() if rgb is image else rgb


def load_queries(spec: str, storage: Storage | None = None) -> list[Query]:
    if not spec:
        raise ConfigError("no queries given: pass --queries (a folder of images, tars, or a Parquet file)")
    fs, path = filesystem(spec, storage)
    if path.endswith(".parquet"):
        queries = _from_parquet(spec, storage)
    elif fs.isdir(path) and not fs.glob(path.rstrip("/") + "/*.tar"):
        queries = _from_folder(fs, path)
    else:
        queries = _from_tars(spec, storage)
    if not queries:
        raise ConfigError(f"no query images found at {spec!r}")
    keys = [q.key for q in queries]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"query keys repeat in {spec!r}: each generated image needs its own key")
    return queries


def _from_folder(fs, path: str) -> list[Query]:
    files = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(IMAGE_SUFFIXES))
    names = set(fs.ls(path, detail=False))
    out = []
    for f in files:
        stem = f.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        txt = f.rsplit(".", 1)[0] + ".txt"
        prompt = fs.cat_file(txt).decode("utf-8", "replace").strip() if txt in names else None
        out.append(Query(stem, _open(fs.cat_file(f)), prompt, unstrip(fs, f)))
    return out


def _from_tars(spec: str, storage: Storage | None) -> list[Query]:
    from pipeline.tars import iter_samples

    out = []
    for url in expand_inputs(spec, storage):
        for sample in iter_samples(url, storage):
            found = sample.image()
            if found is None:
                continue
            out.append(Query(sample.key, _open(found[1].data), sample.caption(), f"{url}#{sample.key}"))
    return out


def _from_parquet(spec: str, storage: Storage | None) -> list[Query]:
    import pyarrow.parquet as pq

    fs, path = filesystem(spec, storage)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    cols = set(table.column_names)
    if "key" not in cols or not ({"image", "path"} & cols):
        raise ConfigError(f"query Parquet {spec!r} needs a 'key' column and an 'image' (bytes) or 'path' column")
    out = []
    for row in table.to_pylist():
        data = row["image"] if row.get("image") is not None else read_bytes(row["path"], storage)
        out.append(Query(str(row["key"]), _open(data), row.get("prompt"), row.get("path") or spec))
    return out


def load_key_set(spec: str, storage: Storage | None = None) -> set[str]:
    """Keys, URLs or hashes from a Parquet/CSV file (every string cell) or a text file (one a line)."""
    fs, path = filesystem(spec, storage)
    if not fs.exists(path):
        raise ConfigError(f"list {spec!r} does not exist")
    if path.endswith(".parquet") or path.endswith(".csv"):
        import pyarrow as pa
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.read_table(f) if path.endswith(".parquet") else pcsv.read_csv(f)
        values: set[str] = set()
        for col in table.columns:
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                values.update(v for v in col.to_pylist() if v)
        return values
    text = read_bytes(spec, storage).decode("utf-8", "replace")
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
