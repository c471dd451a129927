"""Image sources: plan deterministic work units, then read each unit's rows.

Supported inputs (``--format auto`` picks one from what the path holds):

- ``folder``: an image folder, recursive (jpg, jpeg, png, webp, bmp, gif, tif, tiff); captions
  from a sidecar ``<stem>.txt`` or a CSV/Parquet of key → caption (``captions=FILE``). The key of
  ``a/b/cat.jpg`` is ``a/b/cat``. img2dataset's ``files`` output is such a folder.
- ``webdataset``: tars of ``{key}.jpg/.txt/.json`` as img2dataset writes them, read as they are.
  When the sibling ``<shard>.parquet`` exists its rows whose ``status`` is not ``success`` are
  skipped and counted (they never reached the tar).
- ``parquet``: an encoded-image binary column and a caption column — LAION-style files,
  img2dataset's ``parquet`` output (``jpg``/``txt``, rows with another ``status`` skipped and
  counted) and ``recompose synth`` output (which adds ground-truth ``gt_instances``/``gt_depth``).

Why our own reader rather than ``ray.data.read_images``/``read_webdataset``: the job needs every
input to come back exactly once, as a row or as an error record, in a deterministic unit (the
output shard), so that a killed job resumes to byte-identical shards. Ray Data's readers drop or
fail on bad files and do not give stable shard boundaries; so the driver plans units here and Ray
Data parallelises ``read_unit`` over them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "jpeg", "img", "image_bytes", "bytes")
CAPTION_COLUMNS = ("caption", "txt", "text", "TEXT", "prompt")
KEY_COLUMNS = ("key", "id", "__key__")
GT_COLUMNS = ("gt_instances", "gt_depth")
Format = Literal["auto", "folder", "webdataset", "parquet"]


@dataclass(frozen=True)
class WorkUnit:
    """One output shard's worth of inputs; ``read_unit`` yields exactly ``len(members)`` rows."""

    shard: str  # output shard name, unique and stable for the same input
    kind: Literal["folder", "webdataset", "parquet"]
    path: str  # the tar or parquet file ("" for folders)
    members: tuple[Any, ...]  # folder: relative image paths; webdataset: keys; parquet: row ids
    captions: tuple[str | None, ...] = ()  # folder with a captions file: one per member
    # (size, mtime_ns) of each file read: a folder's images and their sidecar captions, or the
    # tar / parquet file; a replaced file changes ``content_digest``
    stats: tuple[tuple[int, int], ...] = ()

    def digest(self) -> str:
        """Identifies the unit's inputs by name (for resume: a changed input means a recomputed shard)."""
        blob = json.dumps([self.shard, self.kind, self.path, list(self.members), list(self.captions)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def content_digest(self) -> str:
        """``digest`` and the size and modification time of every file read: a file replaced
        under the same name recomputes its shard."""
        blob = json.dumps([self.digest(), [list(s) for s in self.stats]])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(
            {
                "shard": self.shard,
                "kind": self.kind,
                "path": self.path,
                "members": list(self.members),
                "captions": list(self.captions),
                "stats": list(self.stats),
            }
        )

    @staticmethod
    def from_json(item: str) -> WorkUnit:
        d = json.loads(item)
        stats = tuple(tuple(s) for s in d.get("stats", ()))
        return WorkUnit(d["shard"], d["kind"], d["path"], tuple(d["members"]), tuple(d["captions"]), stats)


def _stat(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of ``path``; (-1, -1) when it does not exist."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return (-1, -1)
    return (info.st_size, info.st_mtime_ns)


@dataclass
class Plan:
    root: str
    kind: str
    units: list[WorkUnit]
    skipped: dict[str, int]  # upstream failures (img2dataset status != success), by status
    has_ground_truth: bool

    @property
    def inputs(self) -> int:
        return sum(len(u.members) for u in self.units)


class SourceError(UserError):
    """The input path cannot be read as the requested format; the message says why."""


def _chunks(seq: list[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    for j, start in enumerate(range(0, len(seq), size)):
        yield j, seq[start : start + size]


def _safe_name(rel: str) -> str:
    stem = rel[: -len(Path(rel).suffix)] if Path(rel).suffix else rel
    return stem.replace(os.sep, "_").replace("/", "_") or "root"


@dataclass(frozen=True)
class _Listing:
    """What one walk of a folder finds: its files (hidden files and folders skipped), and the
    names of everything in it, files and folders, so that a sidecar's existence needs no stat."""

    files: tuple[str, ...]  # relative paths, sorted
    names: frozenset[str]  # relative paths of the files and the folders

    @classmethod
    def of(cls, root: Path) -> _Listing:
        found, names = [], set()
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, root)
            for name in (*dirnames, *filenames):
                names.add(name if rel == "." else os.path.join(rel, name))
            found += [f if rel == "." else os.path.join(rel, f) for f in filenames if not f.startswith(".")]
        return cls(tuple(sorted(found)), frozenset(names))

    def matching(self, suffixes: tuple[str, ...]) -> list[str]:
        return [f for f in self.files if f.lower().endswith(suffixes)]


def _parquet_image_column(path: Path, wanted: str | None) -> str | None:
    names = pq.read_schema(path).names
    if wanted:
        return wanted if wanted in names else None
    return next((c for c in IMAGE_COLUMNS if c in names), None)


def detect_format(path: str, listing: _Listing | None = None) -> Literal["folder", "webdataset", "parquet"]:
    """The format of ``path``; ``listing``: the folder's, when the caller has walked it already."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"input {path!r} does not exist")
    if p.is_file():
        if p.suffix == ".tar":
            return "webdataset"
        if p.suffix == ".parquet":
            return "parquet"
        raise SourceError(f"input file {path!r} is neither a .tar nor a .parquet; give a folder for images")
    listing = listing or _Listing.of(p)
    if listing.matching((".tar",)):
        return "webdataset"
    parquets = listing.matching((".parquet",))
    if parquets and _parquet_image_column(p / parquets[0], None):
        return "parquet"
    if listing.matching(IMAGE_EXTENSIONS):
        return "folder"
    raise SourceError(f"input {path!r} holds no images, tars or parquet files with an image column")


def load_captions(path: str) -> dict[str, str]:
    """A key → caption mapping from a CSV (columns key,caption) or a Parquet file."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"captions file {path!r} does not exist")
    if p.suffix == ".parquet":
        t = pq.read_table(p)
        kc = next((c for c in KEY_COLUMNS if c in t.column_names), None)
        cc = next((c for c in CAPTION_COLUMNS if c in t.column_names), None)
        if not kc or not cc:
            raise SourceError(
                f"captions file {path!r} needs a key column {KEY_COLUMNS} and a caption column {CAPTION_COLUMNS}"
            )
        return dict(zip(t.column(kc).to_pylist(), t.column(cc).to_pylist(), strict=True))
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        kc = next((c for c in KEY_COLUMNS if c in fields), None)
        cc = next((c for c in CAPTION_COLUMNS if c in fields), None)
        if not kc or not cc:
            raise SourceError(
                f"captions file {path!r} needs a header with a key column {KEY_COLUMNS} and a caption column {CAPTION_COLUMNS}"
            )
        return {row[kc]: row[cc] for row in reader}


def _plan_folder(
    root: Path, shard_size: int, captions: str | None, listing: _Listing | None
) -> list[WorkUnit]:
    if listing is None:
        raise SourceError(f"--format folder needs a directory, got {str(root)!r}")
    files = listing.matching(IMAGE_EXTENSIONS)
    if not files:
        raise SourceError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
    table = load_captions(captions) if captions else None
    units = []
    for j, chunk in _chunks(files, shard_size):
        caps: tuple[str | None, ...] = ()
        if table is not None:
            caps = tuple(table.get(str(Path(f).with_suffix("")), table.get(f)) for f in chunk)
        stats = tuple(s for f in chunk for s in (_stat(root / f), _sidecar_stat(root, f, listing)))
        units.append(WorkUnit(f"folder-{j:05d}", "folder", "", tuple(chunk), caps, stats))
    return units


def _sidecar_stat(root: Path, image: str, listing: _Listing) -> tuple[int, int]:
    """``_stat`` of the image's caption file (``.txt`` beside it); no stat when the listing has none."""
    txt = str(Path(image).with_suffix(".txt"))
    return _stat(root / txt) if txt in listing.names else (-1, -1)


def _plan_webdataset(
    root: Path, shard_size: int, skipped: Counter[str], listing: _Listing | None
) -> list[WorkUnit]:
    tars = [""] if listing is None else listing.matching((".tar",))
    if not tars:
        raise SourceError(f"no .tar files under {str(root)!r}")
    units = []
    for rel in tars:
        tar = root if rel == "" else root / rel
        keys, skip = _tar_keys(tar)
        skipped.update(skip)
        name = _safe_name(tar.name if rel == "" else rel)
        for j, chunk in _chunks(keys, shard_size):
            units.append(WorkUnit(f"{name}-{j:04d}", "webdataset", str(tar), tuple(chunk), (), (_stat(tar),)))
    return units


def _plan_parquet(
    root: Path, shard_size: int, image_column: str | None, skipped: Counter[str], listing: _Listing | None
) -> tuple[list[WorkUnit], bool]:
    """The units of every parquet file (img2dataset's failed rows skipped), and whether every file
    carries the synthetic set's ground-truth columns."""
    files = [""] if listing is None else listing.matching((".parquet",))
    files = [f for f in files if (root if f == "" else root / f).name != "errors.parquet"]
    if not files:
        raise SourceError(f"no .parquet files under {str(root)!r}")
    units, has_gt = [], False
    for rel in files:
        file = root if rel == "" else root / rel
        if _parquet_image_column(file, image_column) is None:
            raise SourceError(
                f"{file}: no image column (looked for {image_column or ', '.join(IMAGE_COLUMNS)}); "
                "set image_column=NAME"
            )
        schema = pq.read_schema(file)
        has_gt = has_gt or all(c in schema.names for c in GT_COLUMNS)
        rows = list(range(pq.ParquetFile(file).metadata.num_rows))
        if "status" in schema.names:
            status = pq.read_table(file, columns=["status"]).column("status").to_pylist()
            skipped.update(s or "null" for s in status if s != "success")
            rows = [i for i in rows if status[i] == "success"]
        name = _safe_name(file.name if rel == "" else rel)
        for j, chunk in _chunks(rows, shard_size):
            units.append(WorkUnit(f"{name}-{j:04d}", "parquet", str(file), tuple(chunk), (), (_stat(file),)))
    return units, has_gt


def plan(
    path: str,
    fmt: Format = "auto",
    shard_size: int = 1000,
    captions: str | None = None,
    image_column: str | None = None,
) -> Plan:
    """Enumerate the inputs of ``path`` deterministically and cut them into work units."""
    root = Path(path)
    # one walk, for the format and the plan; None: a file (or nothing, which is refused below)
    listing = _Listing.of(root) if root.is_dir() else None
    kind = detect_format(path, listing) if fmt == "auto" else fmt
    if not root.exists():
        raise SourceError(f"input {path!r} does not exist")
    skipped: Counter[str] = Counter()
    has_gt = False
    if kind == "folder":
        units = _plan_folder(root, shard_size, captions, listing)
    elif kind == "webdataset":
        units = _plan_webdataset(root, shard_size, skipped, listing)
    elif kind == "parquet":
        units, has_gt = _plan_parquet(root, shard_size, image_column, skipped, listing)
    else:
        raise SourceError(f"unknown format {kind!r}; known: auto, folder, webdataset, parquet")
    names = [u.shard for u in units]
    if len(set(names)) != len(names):
        raise SourceError(
            f"input {path!r} yields clashing shard names; rename files that differ only by extension"
        )
    return Plan(str(root), kind, units, dict(sorted(skipped.items())), has_gt)


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: the extension starts at the basename's first dot."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), (ext.lower() if dot else "")


def _tar_keys(tar: Path) -> tuple[list[str], Counter[str]]:
    """Keys with an image in the tar (in tar order) and img2dataset's skipped statuses."""
    skipped: Counter[str] = Counter()
    sibling = tar.with_suffix(".parquet")
    if sibling.is_file():
        t = pq.read_table(sibling)
        if "key" in t.column_names and "status" in t.column_names:
            keys, status = t.column("key").to_pylist(), t.column("status").to_pylist()
            skipped.update(s or "null" for s in status if s != "success")
            return [k for k, s in zip(keys, status, strict=True) if s == "success"], skipped
    keys: dict[str, None] = {}
    try:
        with tarfile.open(tar, mode="r:*") as tf:
            for m in tf:
                if m.isfile():
                    key, ext = _split_member(m.name)
                    if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                        keys.setdefault(key)
    except (tarfile.TarError, OSError) as e:
        # A tar that breaks part-way still yields the keys read before the break; a tar that
        # cannot be opened at all is one error the planner surfaces clearly.
        if not keys:
            raise SourceError(f"{tar}: cannot be read as a tar ({type(e).__name__}: {e})") from e
    return list(keys), skipped


# ---------------------------------------------------------------------------------------------
# Reading (runs inside Ray Data tasks)


def _row(unit: WorkUnit, index: int, key: str, source: str, **kw: Any) -> dict[str, Any]:
    row = {
        "shard": unit.shard,
        "index": index,
        "key": key,
        "source": source,
        "text": "",
        "data": b"",
        "gt_instances_png": b"",
        "gt_depth_png": b"",
        "err_stage": "",
        "err_type": "",
        "err_msg": "",
    }
    row.update(kw)
    return row


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def error_message(e: BaseException) -> str:
    """A deterministic, bounded message for an error record (object addresses removed)."""
    return _ADDRESS.sub("", str(e) or repr(e))[:1000]


def _error(unit: WorkUnit, index: int, key: str, source: str, e: BaseException) -> dict[str, Any]:
    return _row(
        unit, index, key, source, err_stage="read", err_type=type(e).__name__, err_msg=error_message(e)
    )


class FileTooLarge(ValueError):
    """An input file or tar member larger than ``max_file_bytes``: recorded, never read."""


def _too_large(size: int, max_bytes: int | None) -> FileTooLarge | None:
    if max_bytes is not None and size > max_bytes:
        return FileTooLarge(f"{size} bytes is over max_file_bytes={max_bytes}; not read")
    return None


def read_unit(
    unit: WorkUnit,
    root: str,
    image_column: str | None = None,
    caption_column: str | None = None,
    max_bytes: int | None = None,
) -> list[dict[str, Any]]:
    """Exactly one row per member: the encoded bytes and caption, or a ``read`` error (also for
    a file or tar member over ``max_bytes``, which is never read)."""
    if unit.kind == "folder":
        return _read_folder(unit, root, max_bytes)
    if unit.kind == "webdataset":
        return _read_tar(unit, max_bytes)
    return _read_parquet(unit, image_column, caption_column)


def _read_folder(unit: WorkUnit, root: str, max_bytes: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for i, rel in enumerate(unit.members):
        path = os.path.join(root, rel)
        key = str(Path(rel).with_suffix("")).replace(os.sep, "/")
        try:
            big = _too_large(os.path.getsize(path), max_bytes)
            if big is not None:
                rows.append(_error(unit, i, key, rel, big))
                continue
            with open(path, "rb") as f:
                data = f.read()
            if unit.captions:
                text = unit.captions[i] or ""
            else:
                side = os.path.splitext(path)[0] + ".txt"
                text = Path(side).read_text(encoding="utf-8").strip() if os.path.exists(side) else ""
            rows.append(_row(unit, i, key, rel, text=text, data=data))
        except (OSError, UnicodeDecodeError) as e:
            rows.append(_error(unit, i, key, rel, e))
    return rows


def _read_tar(unit: WorkUnit, max_bytes: int | None = None) -> list[dict[str, Any]]:
    want = {k: i for i, k in enumerate(unit.members)}
    found: dict[str, dict[str, bytes]] = {}
    too_large: dict[str, FileTooLarge] = {}
    failure: BaseException | None = None
    try:
        with tarfile.open(unit.path, mode="r:*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_member(m.name)
                if key not in want:
                    # A sample's files are contiguous: once every wanted key has been seen and
                    # another key starts, the rest of the tar belongs to other units.
                    if len(found) == len(want):
                        break
                    continue
                big = _too_large(m.size, max_bytes)
                if big is not None:
                    too_large[key] = big
                    found.setdefault(key, {})
                    continue
                f = tf.extractfile(m)
                found.setdefault(key, {})[ext] = f.read() if f else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        failure = e
    tar = os.path.basename(unit.path)
    rows = []
    for key, i in want.items():
        src = f"{tar}:{key}"
        files = found.get(key, {})
        if key in too_large:
            rows.append(_error(unit, i, key, src, too_large[key]))
            continue
        img_ext = next((e for e in files if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
        if img_ext is None:
            why = failure or KeyError(f"no image for key {key!r} in {tar}")
            rows.append(_error(unit, i, key, src, why))
            continue
        text = files.get("txt", b"").decode("utf-8", "replace").strip()
        rows.append(_row(unit, i, key, src, text=text, data=files[img_ext]))
    return rows


def _cell_bytes(v: Any) -> bytes | None:
    if isinstance(v, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        v = v.get("bytes")
    return v if isinstance(v, (bytes, bytearray)) else None


def _read_rows(file: Path, columns: list[str], lo: int, hi: int) -> tuple[pa.Table, int]:
    """Only the row groups holding rows ``lo..hi-1``, and the file row their first row is.

    A file is cut into many units; reading it whole for each would read it once per unit.
    """
    pf = pq.ParquetFile(file)
    groups, first, start = [], 0, 0
    for g in range(pf.metadata.num_row_groups):
        end = start + pf.metadata.row_group(g).num_rows
        if end > lo and start < hi:
            if not groups:
                first = start
            groups.append(g)
        start = end
    return pf.read_row_groups(groups, columns=columns), first


def _read_parquet(
    unit: WorkUnit, image_column: str | None, caption_column: str | None
) -> list[dict[str, Any]]:
    file = Path(unit.path)
    names = pq.read_schema(file).names
    img_col = _parquet_image_column(file, image_column)
    cap_col = (
        caption_column if caption_column in names else next((c for c in CAPTION_COLUMNS if c in names), None)
    )
    key_col = next((c for c in KEY_COLUMNS if c in names), None)
    cols = [c for c in (img_col, cap_col, key_col, *GT_COLUMNS) if c and c in names]
    table, lo = _read_rows(file, cols, min(unit.members), max(unit.members) + 1)
    data = {c: table.column(c).to_pylist() for c in cols}
    rows = []
    for i, r in enumerate(unit.members):
        j = r - lo
        key = str(data[key_col][j]) if key_col and data[key_col][j] is not None else f"{file.stem}-{r:08d}"
        src = f"{file.name}#{r}"
        img = _cell_bytes(data[img_col][j])
        if not img:
            rows.append(
                _error(unit, i, key, src, ValueError(f"row {r}: column {img_col!r} holds no image bytes"))
            )
            continue
        text = str(data[cap_col][j] or "") if cap_col else ""
        gt = {f"{c}_png": _cell_bytes(data[c][j]) or b"" for c in GT_COLUMNS if c in data}
        rows.append(_row(unit, i, key, src, text=text, data=img, **gt))
    return rows
