"""The quickstart's serve stage from the outside: the JSON API of ``recompose serve`` over HTTP.

It asks a running app which conditions it can decompose, then generates from one image (the
first synthetic one, "a" in the requests) under each condition subset (caption, each local map,
mask + caption, all), as any HTTP client would (docs/serving.md), and keeps every PNG that came
back. When the shipped reference model is served too (its own app, under ``/reference``), it
gets the same requests with the same seeds, so the report can show both side by side.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.files import encode_png, write_bytes, write_json
from pipelines.quickstart.results import Generation, QuickstartError, ServeResult

log = logging.getLogger(__name__)

# Serve answers a request once the whole batch is sampled: minutes on a CPU for the full plan.
TIMEOUT_S = 600


class ServeClient:
    """JSON requests to one Serve app at ``base`` (``http://host:port``, no trailing slash)."""

    def __init__(self, base: str, timeout: float = TIMEOUT_S):
        self.base = base
        self.timeout = timeout

    def get(self, path: str) -> dict[str, Any]:
        return self._request("GET", path, None)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", path, json.dumps(body).encode())

    def _request(self, method: str, path: str, data: bytes | None) -> dict[str, Any]:
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise QuickstartError(
                f"{method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}"
            ) from None


@dataclass(frozen=True)
class Reference:
    """The image every generation is conditioned on, as `recompose synth` stores it."""

    png: bytes
    text: str  # its caption


def first_synth_image(synth_dir: Path) -> Reference:
    """The first row of the synthetic dataset's first shard."""
    import pyarrow.parquet as pq

    files = sorted(synth_dir.glob("*.parquet"))
    if not files:
        raise QuickstartError(f"{synth_dir} holds no parquet shards")
    row = pq.read_table(files[0], columns=["image", "caption"]).slice(0, 1).to_pylist()[0]
    return Reference(png=row["image"], text=row["caption"])


def centre_mask(png: bytes) -> str:
    """A base64 PNG mask (white = regenerate) of the image's central square, half its side."""
    import numpy as np
    from PIL import Image

    w, h = Image.open(io.BytesIO(png)).size
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h - h // 4, w // 4 : w - w // 4] = 255
    return base64.b64encode(encode_png(mask)).decode()


def condition_subsets(decomposable: list[str], ref: Reference) -> dict[str, dict[str, Any]]:
    """Subset name -> the request's ``conditions``; maps are decomposed by Serve from image "a"."""
    subsets: dict[str, dict[str, Any]] = {"caption": {"text": ref.text}}
    for name in decomposable:
        subsets[name] = {name: {"image": "a"}}
    subsets["mask+caption"] = {"text": ref.text, "mask": {"mask": centre_mask(ref.png), "source": "a"}}
    if decomposable:
        subsets["all"] = {"text": ref.text, **{n: {"image": "a"} for n in decomposable}}
    return subsets


def _save_answer(out: Path, name: str, conditions: dict[str, Any], answer: dict[str, Any]) -> Generation:
    """The generated PNGs, and those of what was given: the mask sent (white = regenerated) and
    each condition map Serve decomposed."""
    images = []
    for k, img in enumerate(answer["images"]):
        write_bytes(base64.b64decode(img), out / f"{name}-{k}.png")
        images.append(f"{name}-{k}.png")
    given = {}
    pictures = {c: v.get("png") for c, v in answer.get("conditions", {}).items()}
    if "mask" in conditions:
        pictures = {"mask": conditions["mask"]["mask"], **pictures}
    for cname, png in pictures.items():
        if png:
            write_bytes(base64.b64decode(png), out / f"{name}-given-{cname}.png")
            given[cname] = f"{name}-given-{cname}.png"
    return Generation(subset=name, conditions=sorted(conditions), images=images, given=given)


def _decomposable(client: ServeClient) -> list[str]:
    """The conditions the app decomposes from an image (its ``GET /v1/model``); the caption and the
    mask are given as text / a drawn mask, never decomposed."""
    model = client.get("/v1/model")
    return [n for n, ok in model["decomposable"].items() if ok is True and n not in ("caption", "mask")]


def _generate(
    client: ServeClient,
    subsets: dict[str, dict[str, Any]],
    ref: Reference,
    out: Path,
    steps: int,
    num_images: int,
    who: str,
) -> list[Generation]:
    """One ``POST /v1/generate`` per subset (seed 0 each), the PNGs written to ``out``."""
    made = []
    for name, conditions in subsets.items():
        body: dict[str, Any] = {"conditions": conditions, "steps": steps, "seed": 0, "num_images": num_images}
        if not ("text" in conditions and len(conditions) == 1):  # caption only: no image to send
            body["images"] = {"a": base64.b64encode(ref.png).decode()}
        answer = client.post("/v1/generate", body)
        made.append(_save_answer(out, name, conditions, answer))
        log.info(
            "  %s: POST /v1/generate %s: %d images in %s",
            who,
            name,
            len(answer["images"]),
            answer["timings_s"],
        )
    return made


def generate_subsets(
    client: ServeClient,
    ref: Reference,
    out: Path,
    steps: int,
    num_images: int,
    reference_app: ServeClient | None = None,
) -> ServeResult:
    """``num_images`` generations per condition subset the app can serve, written to ``out``
    (``reference.png``: the image conditioned on, ``<subset>-<k>.png``,
    ``<subset>-given-<condition>.png``, ``generations.json``).

    ``reference_app``: the shipped reference model's app, asked the same requests (same seeds) and
    written the same way to ``out/reference/``; a subset it cannot decompose is left out for it.
    """
    subsets = condition_subsets(_decomposable(client), ref)
    write_bytes(ref.png, out / "reference.png")
    made = _generate(client, subsets, ref, out, steps, num_images, "your model")
    theirs: list[Generation] = []
    if reference_app is not None:
        can = set(_decomposable(reference_app))
        same = {n: c for n, c in subsets.items() if all(k in can or k in ("text", "mask") for k in c)}
        for name in subsets.keys() - same.keys():
            log.info("  reference model: %s left out (it cannot decompose all of it)", name)
        theirs = _generate(reference_app, same, ref, out / "reference", steps, num_images, "reference model")
    result = ServeResult(url=client.base, text=ref.text, generations=made, reference=theirs)
    write_json(asdict(result), out / "generations.json")
    return result
