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


@dataclass
class QuerySet:
    """The readable queries, and what could not be read (source, why): skipped, counted in run.json."""

    queries: list[Query]
    unreadable: list[tuple[str, str]]


def load_queries(spec: str, storage: Storage | None = None) -> QuerySet:
    if not spec:
        raise ConfigError("no queries given: pass --queries (a folder of images, tars, or a Parquet file)")
    fs, path = filesystem(spec, storage)
    if path.endswith(".parquet"):
        found = _from_parquet(spec, storage)
    elif fs.isdir(path) and not fs.glob(path.rstrip("/") + "/*.tar"):
        found = _from_folder(fs, path)
    else:
        found = _from_tars(spec, storage)
    if not found.queries:
        why = f" ({len(found.unreadable)} unreadable, e.g. {found.unreadable[0][0]}: {found.unreadable[0][1]})" \
            if found.unreadable else ""
        raise ConfigError(f"no query images found at {spec!r}{why}")
    keys = [q.key for q in found.queries]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"query keys repeat in {spec!r}: each generated image needs its own key")
    return found


def _decoded(source: str, data: bytes, unreadable: list[tuple[str, str]]) -> Image.Image | None:
    try:
        return _open(data)
    except Exception as exc:  # noqa: BLE001 - an unreadable query is skipped and counted, never a crash
        unreadable.append((source, f"{type(exc).__name__}: {exc}"[:300]))
        return None


def _from_folder(fs, path: str) -> QuerySet:
    names = sorted(fs.ls(path, detail=False))
    files = [p for p in names if p.lower().endswith(IMAGE_SUFFIXES)]
    unreadable = [(unstrip(fs, p), "not an image file") for p in names
                  if not p.lower().endswith((*IMAGE_SUFFIXES, ".txt")) and fs.isfile(p)]
    out = []
    for f in files:
        stem = f.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        txt = f.rsplit(".", 1)[0] + ".txt"
        image = _decoded(unstrip(fs, f), fs.cat_file(f), unreadable)
        if image is not None:
            prompt = fs.cat_file(txt).decode("utf-8", "replace").strip() if txt in names else None
            out.append(Query(stem, image, prompt, unstrip(fs, f)))
    return QuerySet(out, unreadable)


def _from_tars(spec: str, storage: Storage | None) -> QuerySet:
    from pipeline.tars import iter_samples

    out, unreadable = [], []
    for url in expand_inputs(spec, storage):
        for sample in iter_samples(url, storage):
            found = sample.image()
            if found is None or found[1].data is None:
                continue
            image = _decoded(f"{url}#{sample.key}", found[1].data, unreadable)
            if image is not None:
                out.append(Query(sample.key, image, sample.caption(), f"{url}#{sample.key}"))
    return QuerySet(out, unreadable)


def _from_parquet(spec: str, storage: Storage | None) -> QuerySet:
    import pyarrow.parquet as pq

    fs, path = filesystem(spec, storage)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    cols = set(table.column_names)
    if "key" not in cols or not ({"image", "path"} & cols):
        raise ConfigError(f"query Parquet {spec!r} needs a 'key' column and an 'image' (bytes) or 'path' column")
    out, unreadable = [], []
    for row in table.to_pylist():
        source = row.get("path") or f"{spec}#{row['key']}"
        data = row["image"] if row.get("image") is not None else read_bytes(row["path"], storage)
        image = _decoded(source, data, unreadable)
        if image is not None:
            out.append(Query(str(row["key"]), image, row.get("prompt"), row.get("path") or spec))
    return QuerySet(out, unreadable)


#: columns a key list (subset, blocklist) is read from, matched without regard to case
KEY_COLUMNS = ("key", "url", "sha256")


def load_key_set(spec: str, storage: Storage | None = None) -> set[str]:
    """Keys, URLs or hashes from a Parquet/CSV file (its key/url/sha256 columns) or a text file (one a line)."""
    fs, path = filesystem(spec, storage)
    if not fs.exists(path):
        raise ConfigError(f"list {spec!r} does not exist")
    if path.endswith(".parquet") or path.endswith(".csv"):
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.read_table(f) if path.endswith(".parquet") else pcsv.read_csv(f)
        wanted = [c for c in table.column_names if c.lower() in KEY_COLUMNS]
        if not wanted:
            raise ConfigError(f"list {spec!r} has no {'/'.join(KEY_COLUMNS)} column (it has "
                              f"{', '.join(table.column_names[:8]) or 'none'}): name the column of keys or URLs")
        values: set[str] = set()
        for name in wanted:
            values.update(str(v) for v in table.column(name).to_pylist() if v not in (None, ""))
        return values
    text = read_bytes(spec, storage).decode("utf-8", "replace")
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
