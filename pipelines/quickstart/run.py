"""``recompose quickstart``: the whole system end to end on the embedded default, on one machine.

Stages, each in its own directory under the work directory and each skipped when a rerun finds it
finished (``.quickstart/<stage>.json``):

    synth      the built-in synthetic dataset                  synth/
    decompose  its eight representations (Ray Data)           decomposed/
    train      the tiny model, tracked in MLflow (Ray Train)   train/ (export: train/export), mlflow.db
    evaluate   condition fidelity and the benchmark (Ray)     eval/
    serve      Ray Serve on 127.0.0.1, samples over HTTP      generations/
    report     an HTML page with PNGs of all of the above     report/index.html

``--fast`` shrinks every stage to seconds (the CI check that everything is wired up); its model
learns nothing. The default plan is sized to finish in about 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("synth", "decompose", "train", "evaluate", "serve", "report")


class QuickstartError(RuntimeError):
    """A stage failed or the work directory belongs to another plan; the message says which."""


@dataclass(frozen=True)
class Plan:
    """How big each stage is."""

    mode: str
    images: int  # synthetic images
    train_steps: int
    train_workers: int
    sample_every: int  # training sample grids (MLflow, train/samples/)
    eval_samples: int  # evaluation rows
    eval_steps: int  # DDIM steps in evaluation and in the HTTP generations
    http_images: int  # images per HTTP request


PLANS = {
    "full": Plan("full", 1000, 600, 2, 200, 16, 25, 4),
    "fast": Plan("fast", 48, 6, 1, 0, 4, 4, 2),
}


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


class Quickstart:
    def __init__(self, workdir: str | Path, fast: bool = False, port: int = 8000):
        self.dir = Path(workdir).resolve()
        self.plan = PLANS["fast" if fast else "full"]
        self.port = port
        self.state = self.dir / ".quickstart"
        self.tracking_uri = f"sqlite:///{self.dir / 'mlflow.db'}"
        self.paths = {
            "synth": self.dir / "synth",
            "decompose": self.dir / "decomposed",
            "train": self.dir / "train",
            "evaluate": self.dir / "eval",
            "serve": self.dir / "generations",
            "report": self.dir / "report",
        }

    # -- bookkeeping ---------------------------------------------------------------------------
    def _check_plan(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        plan_file = self.state / "plan.json"
        plan = asdict(self.plan)
        if plan_file.is_file():
            old = json.loads(plan_file.read_text())
            if old != plan:
                raise QuickstartError(
                    f"--workdir {self.dir} holds a {old.get('mode')!r} quickstart, this is {plan['mode']!r}: "
                    "use another --workdir (or delete this one)"
                )
        else:
            plan_file.write_text(json.dumps(plan, indent=2))

    def _done(self, stage: str) -> dict[str, Any] | None:
        f = self.state / f"{stage}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def _finish(self, stage: str, summary: dict[str, Any]) -> dict[str, Any]:
        (self.state / f"{stage}.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary

    # -- the run -------------------------------------------------------------------------------
    def run(self, keep_serving: bool = False) -> dict[str, Any]:
        """Runs (or resumes) every stage; returns where everything is."""
        self._check_plan()
        t0 = time.perf_counter()
        steps = {
            "synth": self._synth,
            "decompose": self._decompose,
            "train": self._train,
            "evaluate": self._evaluate,
            "serve": self._serve_generations,
            "report": self._report,
        }
        results: dict[str, Any] = {}
        for i, stage in enumerate(STAGES, 1):
            done = self._done(stage)
            if done is not None:
                _say(f"{i}/{len(STAGES)} {stage}: finished earlier, reused ({self.paths[stage]})")
                results[stage] = done
                continue
            _say(f"{i}/{len(STAGES)} {stage} -> {self.paths[stage]}")
            ts = time.perf_counter()
            results[stage] = self._finish(stage, steps[stage](results))
            _say(f"{i}/{len(STAGES)} {stage}: done in {time.perf_counter() - ts:.0f}s")
        where = self.where(results)
        where["seconds"] = round(time.perf_counter() - t0, 1)
        (self.dir / "quickstart.json").write_text(json.dumps(where, indent=2))
        if keep_serving:
            self._start_serve(results["train"]["export"])
        return where

    def where(self, results: dict[str, Any]) -> dict[str, Any]:
        train = results["train"]
        return {
            "workdir": str(self.dir),
            "report": str(self.paths["report"] / "index.html"),
            "export": train["export"],
            "model_uri": (
                f"models:/{train['registered_model']}/{train['model_version']}"
                if train.get("model_version")
                else None
            ),
            "mlflow_tracking_uri": self.tracking_uri,
            "mlflow_ui": f"mlflow ui --backend-store-uri {self.tracking_uri}",
            "web_page": f"http://127.0.0.1:{self.port}/",
            "evaluation": str(self.paths["evaluate"] / "results.md"),
        }

    # -- stages --------------------------------------------------------------------------------
    # Each Ray stage runs as its own `python -m jobs.<stage>` process, exactly the command a user
    # would type, with its own local Ray: nothing one stage leaves behind (actor pools, object
    # store) holds CPUs the next one waits for.
    def _synth(self, _: dict[str, Any]) -> dict[str, Any]:
        from pipelines.data.synth import write_synth

        return write_synth(self.paths["synth"], count=self.plan.images, resolution=64, seed=0, split="train")

    def _decompose(self, _: dict[str, Any]) -> dict[str, Any]:
        out = self.paths["decompose"]
        args = ["--input", str(self.paths["synth"]), "--output", str(out)]
        _job("decompose", [*args, "--config", str(ROOT / "configs/decompose-laptop.yaml")])
        totals = json.loads((out / "manifest.json").read_text())["totals"]
        return {"output": str(out), "rows": totals["rows"], "errors": totals["errors"]}

    def _train(self, _: dict[str, Any]) -> dict[str, Any]:
        p = self.plan
        sets = {
            "checkpoint_every": max(1, p.train_steps // 3),
            "mlflow.tracking_uri": self.tracking_uri,
            "mlflow.sample_every": p.sample_every,
            "mlflow.log_every": max(1, min(10, p.train_steps)),
            "optim.warmup_steps": min(100, p.train_steps // 2),
        }
        run = self.paths["train"]
        args = ["--data", str(self.paths["decompose"]), "--output", str(run)]
        args += ["--config", str(ROOT / "configs/train-laptop.yaml"), "--max-steps", str(p.train_steps)]
        args += ["--workers", str(p.train_workers), *_sets(sets)]
        t0 = time.perf_counter()
        _job("train", args)
        export = json.loads((run / "export" / "recompose-training.json").read_text())
        return {
            "run_dir": str(run),
            "export": str(run / "export"),
            "steps": export.get("step"),
            "registered_model": "recompose" if export.get("version") else None,
            "model_version": export.get("version"),
            "model_uri": export.get("model_uri"),
            "mlflow_run_id": export.get("run_id"),
            "seconds": round(time.perf_counter() - t0, 1),
        }

    def _evaluate(self, results: dict[str, Any]) -> dict[str, Any]:
        p = self.plan
        out = self.paths["evaluate"]
        args = ["--model", results["train"]["export"], "--data", str(self.paths["decompose"])]
        args += ["--output", str(out), "--num-samples", str(p.eval_samples)]
        sets = {
            "steps": p.eval_steps,
            "mlflow.tracking_uri": self.tracking_uri,
            "grid_rows": min(4, p.eval_samples),
        }
        _job("evaluate", [*args, *_sets(sets)])
        summary = json.loads((out / "evaluate.json").read_text())
        return {
            "output": str(out),
            "seconds": summary.get("seconds"),
            "quality_bar": summary.get("quality_bar"),
        }

    def _start_serve(self, export: str) -> str:
        """``recompose serve --model EXPORT --port PORT --detach``: deployed and ready on return."""
        from pipelines.serve import launch
        from pipelines.serve.config import ServeConfig

        launch.deploy(ServeConfig(model=export, port=self.port))
        return f"http://127.0.0.1:{self.port}"

    def _serve_generations(self, results: dict[str, Any]) -> dict[str, Any]:
        """Starts Serve with the export and asks its HTTP API for a generation per condition subset."""
        from ray import serve

        out = self.paths["serve"]
        out.mkdir(parents=True, exist_ok=True)
        base = self._start_serve(results["train"]["export"])
        try:
            model = _http(base, "GET", "/v1/model")
            source = _first_synth_image(self.paths["synth"])
            png = source["png"]
            (out / "reference.png").write_bytes(png)
            decomposable = [
                n for n, ok in model["decomposable"].items() if ok is True and n not in ("caption", "mask")
            ]
            subsets = {"caption": {"text": source["text"]}}
            for name in decomposable:
                subsets[name] = {name: {"image": "a"}}
            subsets["mask+caption"] = {
                "text": source["text"],
                "mask": {"mask": _centre_mask(png), "source": "a"},
            }
            if decomposable:
                subsets["all"] = {"text": source["text"], **{n: {"image": "a"} for n in decomposable}}
            made = []
            for name, conditions in subsets.items():
                body = {
                    "images": {"a": base64.b64encode(png).decode()},
                    "conditions": conditions,
                    "steps": self.plan.eval_steps,
                    "seed": 0,
                    "num_images": self.plan.http_images,
                }
                if "text" in conditions and len(conditions) == 1:
                    body.pop("images")
                answer = _http(base, "POST", "/v1/generate", body)
                files = []
                for k, img in enumerate(answer["images"]):
                    f = out / f"{name}-{k}.png"
                    f.write_bytes(base64.b64decode(img))
                    files.append(f.name)
                shown = {}
                if "mask" in conditions:  # the mask sent (white = regenerated), as the other conditions
                    f = out / f"{name}-given-mask.png"
                    f.write_bytes(base64.b64decode(conditions["mask"]["mask"]))
                    shown["mask"] = f.name
                for cname, c in answer.get("conditions", {}).items():
                    if c.get("png"):
                        f = out / f"{name}-given-{cname}.png"
                        f.write_bytes(base64.b64decode(c["png"]))
                        shown[cname] = f.name
                made.append(
                    {"subset": name, "conditions": sorted(conditions), "images": files, "given": shown}
                )
                _say(f"  POST /v1/generate {name}: {len(files)} images in {answer['timings_s']}")
            summary = {"url": base, "text": source["text"], "generations": made}
            (out / "generations.json").write_text(json.dumps(summary, indent=2))
            return summary
        finally:
            serve.shutdown()

    def _report(self, results: dict[str, Any]) -> dict[str, Any]:
        report = self.paths["report"]
        images = report / "images"
        images.mkdir(parents=True, exist_ok=True)

        def copy(src: Path, name: str) -> str | None:
            if not src.is_file():
                return None
            shutil.copyfile(src, images / name)
            return f"images/{name}"

        ev = self.paths["evaluate"]
        train = self.paths["train"]
        gens = results["serve"]
        pics = {
            "synth": copy(self.paths["synth"] / "preview.png", "synth.png"),
            "decomposed": copy(self.paths["decompose"] / "preview.png", "representations.png"),
            "metrics": copy(train / "metrics.png", "training-metrics.png"),
            "fidelity": copy(ev / "fidelity.png", "fidelity.png"),
            "benchmark": copy(ev / "benchmark.png", "benchmark.png"),
            "examples": copy(ev / "examples.png", "examples.png"),
        }
        samples = sorted((train / "samples").glob("*.png")) if (train / "samples").is_dir() else []
        pics["samples"] = copy(samples[-1], "training-samples.png") if samples else None
        for g in gens["generations"]:
            for f in [*g["images"], *g["given"].values()]:
                copy(self.paths["serve"] / f, f)
        copy(self.paths["serve"] / "reference.png", "reference.png")
        where = self.where(results)
        body = _report_html(self.plan, where, results, pics, gens, (ev / "results.md").read_text())
        (report / "index.html").write_text(body)
        return {"report": str(report / "index.html"), "images": sorted(p.name for p in images.iterdir())}


# -- helpers -------------------------------------------------------------------------------------
def _sets(values: dict[str, Any]) -> list[str]:
    return [x for k, v in values.items() for x in ("--set", f"{k}={v}")]


def _job(stage: str, args: list[str]) -> None:
    """``python -m jobs.<stage> ARGS`` in a process of its own; its progress goes to our stderr."""
    import os
    import subprocess

    cmd = [sys.executable, "-m", f"jobs.{stage}", *args]
    _say("  $ " + " ".join(cmd[1:]))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=sys.stderr).returncode
    if code != 0:
        raise QuickstartError(
            f"the {stage} stage failed (exit {code}); its output is above. Rerun to resume."
        )


def _http(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise QuickstartError(
            f"{method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}"
        ) from None


def _centre_mask(png: bytes) -> str:
    """A base64 PNG mask (white = regenerate) of the image's central square, half its side."""
    import io

    import numpy as np
    from PIL import Image

    w, h = Image.open(io.BytesIO(png)).size
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h - h // 4, w // 4 : w - w // 4] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _first_synth_image(synth_dir: Path) -> dict[str, Any]:
    """The first image of the synthetic dataset (its PNG bytes, as `recompose synth` stores them)
    and its caption."""
    import pyarrow.parquet as pq

    files = sorted(synth_dir.glob("*.parquet"))
    if not files:
        raise QuickstartError(f"{synth_dir} holds no parquet shards")
    row = pq.read_table(files[0], columns=["image", "caption"]).slice(0, 1).to_pylist()[0]
    return {"png": row["image"], "text": row["caption"]}


def markdown_to_html(text: str) -> str:
    """The subset of Markdown that eval_report writes: headings, pipe tables, bullets, paragraphs."""

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")) + 1)
            out.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(set(c) <= set("-: ") for c in cells):
                    rows.append(cells)
                i += 1
            head, *rest = rows
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rest]
            out.append("</table>")
            continue
        elif line.startswith("- "):
            out.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                out.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("</ul>")
            continue
        elif line:
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
img{image-rendering:pixelated;max-width:100%;border:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}
th{background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}.gen{display:flex;gap:6px;flex-wrap:wrap;align-items:end}
.gen img{width:128px}.cap{font-size:12px;color:#555}
"""


def _report_html(plan, where, results, pics, gens, results_md: str) -> str:
    def img(key: str, alt: str) -> str:
        return f'<p><img src="{pics[key]}" alt="{html.escape(alt)}"></p>' if pics.get(key) else ""

    rows = []
    for g in gens["generations"]:
        given = "".join(
            f'<figure><img src="images/{f}" alt="{c}"><figcaption class="cap">{c} given</figcaption></figure>'
            for c, f in g["given"].items()
        )
        made = "".join(f'<img src="images/{f}" alt="generated">' for f in g["images"])
        rows.append(
            f"<h3>{html.escape(g['subset'])}</h3><div class='gen'>{given}{made}</div>"
            f"<p class='cap'>conditions: {html.escape(', '.join(g['conditions']))}</p>"
        )
    train = results["train"]
    info = [
        ("work directory", where["workdir"]),
        ("trained pipeline", where["export"] + (f"  ({where['model_uri']})" if where["model_uri"] else "")),
        ("MLflow store", f"{where['mlflow_tracking_uri']} — browse with: {where['mlflow_ui']}"),
        ("web page", f"{where['web_page']} (while `recompose quickstart` or `recompose serve` runs)"),
        ("training", f"{train.get('steps')} steps in {train.get('seconds')} s"),
    ]
    fast = (
        "<p><b>--fast</b>: every stage shrunk to seconds to check the wiring; this model has learnt nothing.</p>"
        if plan.mode == "fast"
        else ""
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>recompose quickstart</title>
<style>{_CSS}</style></head><body>
<h1>recompose quickstart</h1>{fast}
<table>{"".join(f"<tr><th>{k}</th><td><code>{html.escape(str(v))}</code></td></tr>" for k, v in info)}</table>
<h2>1. The synthetic dataset</h2>{img("synth", "synthetic images")}
<h2>2. Decomposed: the eight representations</h2>
<p>As the decomposition job stored them: the caption (its text; CLIP/T5 embeddings need their
weights), sketch, instances, depth, intensity and palette. <i>semantics</i>: without CLIP weights
the model's own image encoder reads the image itself; <i>mask</i>: drawn at training time and
given at inference (section 4, mask + caption).</p>{img("decomposed", "representations")}
<h2>3. Training</h2>{img("metrics", "training metrics")}{img("samples", "training samples")}
<h2>4. Generations through the HTTP API</h2>
<p>The reference image (a) and its caption: <i>{html.escape(gens["text"])}</i></p>
<p><img src="images/reference.png" alt="reference" style="width:128px"></p>
{"".join(rows)}
<h2>5. Evaluation</h2>{img("fidelity", "fidelity")}{img("benchmark", "benchmark")}{img("examples", "examples")}
{markdown_to_html(results_md)}
</body></html>
"""
