"""Reading a decomposition for a model: the manifest checked (``open_data``) and rows turned into
model-ready numpy batches (``prepare_batch``: decode the fixed-size binary columns, augment,
tokenize captions). Training runs ``prepare_batch`` in Ray Data tasks; evaluation on its rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.conditions import MAPS
from pipelines.config import hash_data
from pipelines.data.augment import AugmentConfig, augment
from pipelines.data.shards import MANIFEST_FORMAT, SHARD_FORMAT, from_binary
from pipelines.errors import UserError

CAPTION_ENCODERS = ("clip", "t5", "base")  # "base": a pretrained base's text encoder (`decompose --base`)


class DataError(UserError):
    """The training data directory is missing, incomplete or not a decomposition output."""


@dataclass(frozen=True)
class DataSpec:
    """What a decomposition output holds, as far as training is concerned."""

    root: str
    files: tuple[str, ...]  # shard paths, manifest order
    rows: int
    resolution: int  # stored side R
    manifest_hash: str  # sha256 of manifest.json: which data a run trained on (MLflow tag)
    conditions: tuple[str, ...]  # CONDITIONS the shards provide (caption from text or embeddings)
    caption_embeddings: tuple[str, ...]  # frozen caption encoders stored ("clip", "t5")
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tensor column -> per-row shape
    settings: dict[str, Any] = field(default_factory=dict)  # the decomposition's extractor settings
    # `latents` (`decompose --base`): the VAE that made them (pipelines/conditions/backbone.py
    # vae_identity) and the base as the decomposition was given it; None: no latents stored
    latents_vae: dict[str, Any] | None = None
    latents_base: str | None = None

    def model_inputs(self, caption_encoder: str, semantics_encoder: str) -> dict[str, Any]:
        """ComposerModel arguments that must match the stored embeddings' widths."""
        out: dict[str, Any] = {"caption_encoder": caption_encoder, "semantics_encoder": semantics_encoder}
        if caption_encoder != "trainable":
            keys = caption_encoder.split("+")
            out["caption_sentence_dim"] = sum(self.shapes[f"caption.{k}_sentence"][0] for k in keys)
            out["caption_length"] = sum(self.shapes[f"caption.{k}_tokens"][0] for k in keys)
            out["caption_token_dim"] = sum(self.shapes[f"caption.{k}_tokens"][1] for k in keys)
        if semantics_encoder == "clip":
            out["semantics_dim"] = self.shapes["semantics"][0]
        return out


def _field_shapes(schema: pa.Schema) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in schema:
        if pa.types.is_struct(f.type):
            for sub in f.type:
                if sub.metadata and b"shape" in sub.metadata:
                    shapes[f"{f.name}.{sub.name}"] = tuple(json.loads(sub.metadata[b"shape"]))
        elif f.metadata and b"shape" in f.metadata:
            shapes[f.name] = tuple(json.loads(f.metadata[b"shape"]))
    return shapes


def open_data(path: str | Path) -> DataSpec:
    """Check ``path`` is a complete decomposition output and describe it."""
    root = Path(path)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(
            f"--data {path}: no manifest.json; give the --output directory of `recompose decompose`"
        )
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise DataError(f"--data {path}: manifest.json is not valid JSON ({e})") from None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("shard_format") != SHARD_FORMAT:
        raise DataError(
            f"--data {path}: manifest format {manifest.get('format')!r}/{manifest.get('shard_format')!r}, "
            f"expected {MANIFEST_FORMAT!r}/{SHARD_FORMAT!r}"
        )
    entries = [e for e in manifest["shards"] if e["rows"] > 0]
    files = tuple(str((root / e["path"]).resolve()) for e in entries)
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise DataError(
            f"--data {path}: {len(missing)} shard(s) in the manifest are missing, e.g. {missing[0]}"
        )
    if not files:
        raise DataError(f"--data {path}: the decomposition has no rows to train on")
    schema = pq.read_schema(files[0])
    names = set(schema.names)
    caption_embeddings: tuple[str, ...] = ()
    if "caption" in names:
        subs = {f.name for f in schema.field("caption").type}
        caption_embeddings = tuple(
            k for k in CAPTION_ENCODERS if f"{k}_sentence" in subs and f"{k}_tokens" in subs
        )
    # Captions come from the text (trainable encoder) or stored embeddings; semantics from a
    # stored CLIP embedding or the image itself (trainable encoder); the mask is drawn here.
    present = {"caption", "semantics", "mask"} | {n for n in ("palette", *MAPS) if n in names}
    latents = manifest.get("extractors", {}).get("latents") if "latents" in names else None
    from models import CONDITIONS  # here, not at the top: see prepare_batch

    return DataSpec(
        root=str(root.resolve()),
        files=files,
        rows=int(sum(e["rows"] for e in entries)),
        resolution=int(manifest["resolution"]),
        manifest_hash=hash_data(raw.decode()),
        conditions=tuple(c for c in CONDITIONS if c in present),
        caption_embeddings=caption_embeddings,
        shapes=_field_shapes(schema),
        settings=dict(manifest.get("settings", {})),
        latents_vae=dict(latents.get("vae") or {}) if latents else None,
        latents_base=latents.get("base") if latents else None,
    )


def resolve_encoders(spec: DataSpec, caption: str, semantics: str) -> tuple[str, str]:
    """The model's caption and semantics encoders: "auto" takes what the shards hold."""
    if caption == "auto":
        caption = "+".join(spec.caption_embeddings) if spec.caption_embeddings else "trainable"
    elif caption != "trainable":
        missing = [k for k in caption.split("+") if k not in spec.caption_embeddings]
        if missing:
            raise DataError(
                f"model.caption_encoder {caption}: the shards hold no {'/'.join(missing)} caption embeddings "
                f"(they hold: {', '.join(spec.caption_embeddings) or 'none, only the caption text'})"
            )
    if semantics == "auto":
        semantics = "clip" if "semantics" in spec.shapes else "trainable"
    elif semantics == "clip" and "semantics" not in spec.shapes:
        raise DataError("model.semantics_encoder clip: the shards hold no semantics (CLIP) column")
    return caption, semantics


@dataclass(frozen=True)
class BatchRecipe:
    """Everything ``prepare_batch`` needs: picklable, small."""

    columns: tuple[str, ...]  # parquet columns read
    shapes: dict[str, tuple[int, ...]]
    resolution: int  # stored R
    size: int  # training side
    conditions: tuple[str, ...]  # conditions trained on
    caption_encoder: str
    semantics_encoder: str
    text_vocab_size: int
    caption_length: int
    augment: AugmentConfig
    latents: bool = False  # read the stored `latents` (a base model's x0); the rows are never cropped


def make_recipe(
    spec: DataSpec, model_config: Any, conditions: tuple[str, ...], augment_cfg: AugmentConfig
) -> BatchRecipe:
    """The columns a model with ``model_config`` needs for ``conditions``, and how to prepare them."""
    cols = ["image"]
    if "caption" in conditions:
        cols.append("text" if model_config.caption_encoder == "trainable" else "caption")
    if "semantics" in conditions and model_config.semantics_encoder == "clip":
        cols.append("semantics")
    cols += [n for n in ("palette", *MAPS) if n in conditions]
    if "mask" in conditions and "instances" not in cols and "instances" in spec.shapes:
        cols.append("instances")  # instance masks are drawn from it even if not trained on
    latents = getattr(model_config, "base_unet", None) is not None
    if latents:
        cols.append("latents")
    return BatchRecipe(
        columns=tuple(cols),
        shapes=dict(spec.shapes),
        resolution=spec.resolution,
        size=int(model_config.sample_size) * int(model_config.local_downsample),
        conditions=conditions,
        caption_encoder=model_config.caption_encoder,
        semantics_encoder=model_config.semantics_encoder,
        text_vocab_size=int(model_config.text_vocab_size),
        caption_length=int(model_config.caption_length),
        augment=augment_cfg,
        latents=latents,
    )


def _tensor(table: pa.Table, name: str, recipe: BatchRecipe, dtype: str) -> np.ndarray:
    if "." in name:
        parent, sub = name.split(".", 1)
        col = table.column(parent).combine_chunks().field(sub)
    else:
        col = table.column(name)
    shape = recipe.shapes[name]
    if len(shape) == 1:  # fixed-size list of float16
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), *shape).astype(np.float16)
    return from_binary(col, dtype, shape)


def prepare_batch(table: pa.Table, recipe: BatchRecipe) -> dict[str, np.ndarray]:
    """A batch of shard rows -> model-ready numpy arrays (see the module docstring).

    Output keys: "image" (B, S, S, 3) uint8; the maps (B, S, S) uint8; "mask" (B, S, S) uint8
    {0, 1}; "palette"/"semantics"/"caption.*" float16; "text_ids" (B, L) int64; "has_caption"
    (B,) bool (an empty caption is an absent one).
    """
    r = recipe.resolution
    rows: dict[str, Any] = {"image": from_binary(table.column("image"), "uint8", (r, r, 3))}
    for name in MAPS:
        if name in recipe.columns:
            rows[name] = from_binary(table.column(name), "uint8", (r, r))
    rng = np.random.default_rng()  # fresh draws every epoch; model noise/dropout are the seeded part
    aug = recipe.augment
    if recipe.latents:  # latents cannot follow a crop or a flip of the pixels: the rows stay whole
        aug = aug.model_copy(update={"crop_scale": (1.0, 1.0), "flip": False})
    rows = augment(rows, aug, rng, recipe.size)
    out: dict[str, np.ndarray] = {"image": rows["image"]}
    if recipe.latents:
        out["latents"] = _tensor(table, "latents", recipe, "float16")
    for name in MAPS:
        if name in recipe.conditions and name in rows:
            out[name] = rows[name]
    if "mask" in recipe.conditions:
        out["mask"] = rows["mask"]
    b = len(table)
    if "palette" in recipe.columns:
        out["palette"] = _tensor(table, "palette", recipe, "float16")
    if "semantics" in recipe.columns:
        out["semantics"] = _tensor(table, "semantics", recipe, "float16")
    if "text" in recipe.columns:
        # Imported here: Ray Data's processes load this module to unpickle prepare_batch, and
        # models (torch, diffusers) costs seconds in each new one that never tokenizes.
        from models.encoders import HashTokenizer

        texts = [str(t) for t in table.column("text").to_pylist()]
        tok = HashTokenizer(recipe.text_vocab_size, recipe.caption_length)
        out["text_ids"] = tok(texts).numpy()
        out["has_caption"] = np.array([bool(t.strip()) for t in texts])
    elif "caption" in recipe.columns:
        for k in recipe.caption_encoder.split("+"):
            for part in ("sentence", "tokens"):
                name = f"caption.{k}_{part}"
                out[name] = _tensor(table, name, recipe, "float16")
        out["has_caption"] = np.ones(b, bool)
    return out
