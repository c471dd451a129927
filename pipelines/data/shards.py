"""The shard format: how rows become Parquet columns, written atomically, and read back.

``shards/<name>.parquet`` holds one row per successfully decomposed input:

    key     string   the input's key (file path without extension, tar key, parquet key)
    source  string   where it came from (relative path, ``tar:key`` or ``file.parquet#row``)
    text    string   the caption text ("" when the source has none)
    image   fixed_size_binary[R*R*3]         the image at the stored resolution, RGB uint8
    <cond>  fixed_size_list<halffloat>[D]    vectors (semantics, palette)
            fixed_size_binary[R*R]           maps (sketch, instances, depth, intensity), uint8
            struct<field: …>                 multi-output conditions (caption; token matrices
                                             are float16 bytes, sentence vectors float16 lists)

1-D tensors are fixed-size lists any Parquet reader sees as numbers. Tensors of two or more
dimensions are their row-major bytes in a ``fixed_size_binary`` column: Parquet stores a list's
every element with its own repetition level, which made a 256×256 image ~20× slower to write and
~10× slower to read than the same bytes as one value. Every tensor field carries ``shape`` (JSON)
and ``dtype`` in its field metadata, so ``to_numpy`` restores arrays without knowing the
resolution; the schema metadata ``recompose`` holds the format id, the resolution and each
condition's extractor fingerprint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.conditions.base import ColumnSpec
from pipelines.files import atomic_write

SHARD_FORMAT = "recompose.shards/1"
MANIFEST_FORMAT = "recompose.decompose/1"  # manifest.json of a decomposition output
_ARROW = {"float16": pa.float16(), "uint8": pa.uint8()}


def list_field(name: str, dtype: str, shape: Sequence[int]) -> pa.Field:
    """The field of a per-row tensor: a fixed-size list if 1-D, else fixed-size row-major bytes."""
    meta = {"shape": json.dumps(list(shape)), "dtype": dtype}
    if len(shape) == 1:
        return pa.field(name, pa.list_(_ARROW[dtype], int(shape[0])), nullable=False, metadata=meta)
    width = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return pa.field(name, pa.binary(width), nullable=False, metadata=meta)


def list_array(a: np.ndarray) -> pa.Array:
    """(N, *shape) array → N rows: a fixed-size list array if 1-D per row, else fixed-size bytes."""
    flat = np.ascontiguousarray(a)
    if flat.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    return binary_array(flat)


def binary_array(a: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(N, ...) array → N fixed-size binary values holding each row's bytes (zero-copy)."""
    flat = np.ascontiguousarray(a)
    width = int(np.prod(flat.shape[1:])) * flat.itemsize
    data = pa.py_buffer(flat.reshape(-1).view(np.uint8)) if flat.size else pa.py_buffer(b"")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(flat), [None, data])


def from_binary(col: pa.Array | pa.ChunkedArray, dtype: str | np.dtype, shape: Sequence[int]) -> np.ndarray:
    """Fixed-size binary rows → (N, *shape) array of ``dtype`` (a read-only view when possible)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n, width = len(col), col.type.byte_width
    if n == 0:
        return np.zeros((0, *shape), dtype)
    raw = np.frombuffer(col.buffers()[1], np.uint8, count=n * width, offset=col.offset * width)
    return raw.view(dtype).reshape(n, *shape)


def condition_fields(name: str, specs: Sequence[ColumnSpec]) -> pa.Field:
    """The on-disk field of one condition: a list column, or a struct of its dotted outputs."""
    if len(specs) == 1 and specs[0].name == name:
        return list_field(name, specs[0].dtype, specs[0].shape)
    subs = [list_field(s.name.split(".", 1)[1], s.dtype, s.shape) for s in specs]
    return pa.field(name, pa.struct(subs), nullable=False)


def condition_array(field: pa.Field, arrays: dict[str, np.ndarray]) -> pa.Array:
    name = field.name
    if pa.types.is_struct(field.type):
        children = [list_array(arrays[f"{name}.{sub.name}"]) for sub in field.type]
        return pa.StructArray.from_arrays(children, fields=list(field.type))
    return list_array(arrays[name])


def shard_schema(
    resolution: int, conditions: dict[str, Sequence[ColumnSpec]], fingerprints: dict[str, str]
) -> pa.Schema:
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        list_field("image", "uint8", (resolution, resolution, 3)),
    ]
    fields += [condition_fields(n, specs) for n, specs in conditions.items()]
    meta = {"format": SHARD_FORMAT, "resolution": resolution, "conditions": fingerprints}
    return pa.schema(fields, metadata={"recompose": json.dumps(meta, sort_keys=True)})


def build_table(schema: pa.Schema, rows: dict[str, np.ndarray]) -> pa.Table:
    """Rows as numpy arrays (flat dotted names for struct fields) → a table of ``schema``."""
    cols = []
    for field in schema:
        if field.name in ("key", "source", "text"):
            cols.append(pa.array([str(v) for v in rows[field.name]], pa.string()))
        elif field.name == "image":
            cols.append(list_array(rows["image"]))
        else:
            cols.append(condition_array(field, rows))
    return pa.Table.from_arrays(cols, schema=schema)


def to_numpy(table: pa.Table) -> dict[str, Any]:
    """A shard table → ``{"key": [...], "image": (N,R,R,3), "caption.clip_tokens": (N,L,D), …}``."""
    out: dict[str, Any] = {}
    for field in table.schema:
        col = table.column(field.name)
        if pa.types.is_struct(field.type):
            col = col.combine_chunks()
            for i, sub in enumerate(field.type):
                out[f"{field.name}.{sub.name}"] = _tensor(sub, col.field(i))
        elif field.metadata and b"shape" in field.metadata:
            out[field.name] = _tensor(field, col)
        else:
            out[field.name] = np.array(col.to_pylist(), dtype=object)
    return out


def _tensor(field: pa.Field, col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    shape = tuple(json.loads(field.metadata[b"shape"]))
    if pa.types.is_fixed_size_binary(field.type):
        return from_binary(col, field.metadata[b"dtype"].decode(), shape)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), *shape)


def read_shard(path: str | Path, columns: Iterable[str] | None = None) -> dict[str, Any]:
    """Read a shard (only ``columns`` if given) into numpy arrays; see ``to_numpy``."""
    return to_numpy(pq.read_table(path, columns=list(columns) if columns is not None else None))


def shard_metadata(path: str | Path) -> dict[str, Any]:
    return json.loads(pq.read_schema(path).metadata[b"recompose"])


def write_parquet(table: pa.Table, path: str | Path, compression: str = "zstd") -> None:
    """Write ``table`` to ``path`` atomically (temporary name in the same folder, then rename)."""
    atomic_write(Path(path), lambda f: pq.write_table(table, f, compression=compression, row_group_size=1024))


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("source", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("index", pa.int64()),
    ]
)


def errors_table(rows: dict[str, Sequence[Any]]) -> pa.Table:
    return pa.Table.from_pydict({f.name: list(rows[f.name]) for f in ERRORS_SCHEMA}, schema=ERRORS_SCHEMA)
