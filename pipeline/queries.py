"""Loading generated images (the queries) and the key lists search filters by.

Queries come from a folder of images (prompt in ``{stem}.txt``), WebDataset tars (prompt in
``{key}.txt``), or a Parquet file with a ``key`` column, an ``image`` (bytes) or ``path``
column, and an optional ``prompt`` column. They are listed first (:func:`list_queries`: keys,
prompts and where the bytes are) and decoded a batch at a time (:func:`read_queries`), so a
search holds one batch of images whatever the number of generations.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from pipeline.embedders.base import to_rgb
from pipeline.errors import ConfigError
from pipeline.storage import Storage, expand_inputs, filesystem, read_bytes, read_range, unstrip

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Query:
    key: str
    image: Image.Image
    prompt: str | None
    source: str


@dataclass
class QueryRef:
    """Where one query's bytes are, without reading them: a file, a tar member (offset, size) or a
    row of a Parquet file's ``image`` column (row group, row within it)."""

    key: str
    prompt: str | None
    source: str
    url: str
    offset: int | None = None
    size: int | None = None
    row_group: int | None = None
    row: int | None = None


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


@dataclass
class QueryList:
    """Every query found, not yet read, and the files that are not images (source, why)."""

    refs: list[QueryRef]
    unreadable: list[tuple[str, str]]


def list_queries(spec: str, storage: Storage | None = None) -> QueryList:
    """Find the queries (keys, prompts, where their bytes are) without decoding any image: a search
    of any number of generations then reads them a batch at a time."""
    if not spec:
        raise ConfigError("no queries given: pass --queries (a folder of images, tars, or a Parquet file)")
    fs, path = filesystem(spec, storage)
    if path.endswith(".parquet"):
        found = _list_parquet(spec, storage)
    elif fs.isdir(path) and not fs.glob(path.rstrip("/") + "/*.tar"):
        found = _list_folder(fs, path)
    else:
        found = _list_tars(spec, storage)
    if not found.refs:
        raise no_queries(spec, found.unreadable)
    keys = [r.key for r in found.refs]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"query keys repeat in {spec!r}: each generated image needs its own key")
    return found


def read_queries(refs: list[QueryRef], storage: Storage | None = None) -> QuerySet:
    """Decode the images of ``refs``; an unreadable one is skipped and counted, never a crash."""
    import pyarrow.parquet as pq

    out, unreadable = [], []
    groups: dict[tuple[str, int], list] = {}  # Parquet row groups read once per call
    for ref in refs:
        try:  # infrastructure errors propagate (storage has retried the transient ones)
            if ref.row_group is not None:
                if (ref.url, ref.row_group) not in groups:
                    fs, path = filesystem(ref.url, storage)
                    with fs.open(path, "rb") as f:
                        groups[(ref.url, ref.row_group)] = pq.ParquetFile(f).read_row_group(
                            ref.row_group, columns=["image"]).column("image").to_pylist()
                data = groups[(ref.url, ref.row_group)][ref.row]
            elif ref.offset is not None:
                data = read_range(ref.url, ref.offset, ref.size, storage)
            else:
                data = read_bytes(ref.url, storage)
        except (FileNotFoundError, EOFError) as exc:  # gone or changed since it was listed
            unreadable.append((ref.source, f"{type(exc).__name__}: {exc}"[:300]))
            continue
        try:
            image = _open(data)
        except Exception as exc:  # noqa: BLE001 - an unreadable query is skipped and counted, never a crash
            unreadable.append((ref.source, f"{type(exc).__name__}: {exc}"[:300]))
            continue
        out.append(Query(ref.key, image, ref.prompt, ref.source))
    return QuerySet(out, unreadable)


def load_queries(spec: str, storage: Storage | None = None) -> QuerySet:
    """Every query of ``spec``, decoded (small sets; search reads them in batches)."""
    listed = list_queries(spec, storage)
    found = read_queries(listed.refs, storage)
    found.unreadable = listed.unreadable + found.unreadable
    if not found.queries:
        raise no_queries(spec, found.unreadable)
    return found


def no_queries(spec: str, unreadable: list[tuple[str, str]]) -> ConfigError:
    """The error when nothing at ``spec`` could be searched, with the first unreadable file and why."""
    why = f" ({len(unreadable)} unreadable, e.g. {unreadable[0][0]}: {unreadable[0][1]})" if unreadable else ""
    return ConfigError(f"no query images found at {spec!r}{why}")


def _list_folder(fs, path: str) -> QueryList:
    names = sorted(fs.ls(path, detail=False))
    files = [p for p in names if p.lower().endswith(IMAGE_SUFFIXES)]
    unreadable = [(unstrip(fs, p), "not an image file") for p in names
                  if not p.lower().endswith((*IMAGE_SUFFIXES, ".txt")) and fs.isfile(p)]
    refs = []
    for f in files:
        stem = f.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        txt = f.rsplit(".", 1)[0] + ".txt"
        prompt = fs.cat_file(txt).decode("utf-8", "replace").strip() if txt in names else None
        refs.append(QueryRef(stem, prompt, unstrip(fs, f), unstrip(fs, f)))
    return QueryList(refs, unreadable)


def _list_tars(spec: str, storage: Storage | None) -> QueryList:
    from pipeline.tars import iter_samples

    refs = []
    for url in expand_inputs(spec, storage):
        for sample in iter_samples(url, storage):
            found = sample.image()
            if found is None or found[1].data is None:
                continue
            member = found[1]
            refs.append(QueryRef(sample.key, sample.caption(), f"{url}#{sample.key}", url, member.offset, member.size))
    return QueryList(refs, [])


def _list_parquet(spec: str, storage: Storage | None) -> QueryList:
    import pyarrow.parquet as pq

    fs, path = filesystem(spec, storage)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = set(pf.schema_arrow.names)
        if "key" not in cols or not ({"image", "path"} & cols):
            raise ConfigError(f"query Parquet {spec!r} needs a 'key' column and an 'image' (bytes) or 'path' column")
        refs = []
        for g in range(pf.num_row_groups):  # every column but the image bytes
            table = pf.read_row_group(g, columns=[c for c in ("key", "path", "prompt") if c in cols])
            has_image = pf.read_row_group(g, columns=["image"]).column("image").is_valid().to_pylist() \
                if "image" in cols else [False] * table.num_rows
            for r, (row, inline) in enumerate(zip(table.to_pylist(), has_image)):
                if inline:
                    refs.append(QueryRef(str(row["key"]), row.get("prompt"), row.get("path") or f"{spec}#{row['key']}",
                                         spec, row_group=g, row=r))
                elif row.get("path"):
                    refs.append(QueryRef(str(row["key"]), row.get("prompt"), row["path"], row["path"]))
    return QueryList(refs, [])


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
