"""Optional webdataset copy of a shard: ``shards/<name>.tar`` with one sample per row.

Per key: ``image.png``, ``txt`` (caption), ``<map>.png`` for maps, ``<vector>.npy`` for vectors
(struct fields as ``caption.<field>.npy``). Written with webdataset's ``TarWriter`` at a fixed
mtime so the tar is byte-identical across reruns.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.data.shards import to_numpy
from pipelines.files import encode_png, write_bytes


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def member_key(key: str) -> str:
    """A sample key as a safe tar member prefix: relative, no ``.`` or ``..`` parts (a key comes
    from input names, which may be anything), dots replaced as webdataset needs."""
    parts = [p for p in str(key).replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts).replace(".", "_") or "_"


def write_tar(table: pa.Table, path: str | Path) -> None:
    import webdataset as wds

    data = to_numpy(table)
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0.0) as sink:
        for i, key in enumerate(data["key"]):
            sample = {
                "__key__": member_key(key),
                "txt": str(data["text"][i]),
                "image.png": encode_png(data["image"][i]),
            }
            for name, arr in data.items():
                if name in ("key", "text", "source", "image"):
                    continue
                a = arr[i]
                sample[f"{name}.png" if a.dtype == np.uint8 and a.ndim == 2 else f"{name}.npy"] = (
                    encode_png(a) if a.dtype == np.uint8 and a.ndim == 2 else _npy(a)
                )
            sink.write(sample)
    write_bytes(buf.getvalue(), path)
