"""``recompose reference``: a finished training run packed as the reference model shipped with
recompose, evaluated, with a README that says exactly how it was made.

The output (default ``pipelines/diffusion/reference``, what ``--model recompose:reference`` and
every command without ``--model`` load) holds:

    model_index.json, scheduler/, unet/   the pipeline; weights in float16 when that changes the
                                          model's output by at most ``HALF_TOLERANCE`` (relative)
    reference.json                        how it was made: training run, config, data, machine
    evaluation/                           ``recompose evaluate`` of the packed model (results.md,
                                          evaluate.json and its plots)
    README.md                             the commands, the facts above and the evaluation table

The evaluation runs on the packed weights (loaded back as float32, as every command loads them),
so ``recompose evaluate --data DATA --output DIR`` reproduces the table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.diffusion.loading import REFERENCE_DIR, REFERENCE_MODEL, pipeline_dir
from pipelines.errors import UserError
from pipelines.files import write_json

log = logging.getLogger(__name__)

HALF_TOLERANCE = 2e-3  # float16 weights kept when they move ε by at most this RMS fraction
EVAL_FILES = (
    "results.md",
    "evaluate.json",
    "metrics.parquet",
    "fidelity.png",
    "benchmark.png",
    "examples.png",
)
PIPELINE_FILES = ("model_index.json", "scheduler", "unet")
RECORD = "reference.json"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # in a source checkout
DEFAULT_ROWS = 64  # EvalConfig.num_samples' default: then `recompose evaluate --data` alone reproduces it


class ReferenceError(UserError):
    """The run cannot be packed; the message says why."""


@dataclass(frozen=True)
class ReferenceResult:
    """What ``recompose reference --json`` prints (also the ``reference.json`` of the output)."""

    output: str
    model: str  # how commands name it: recompose:reference, or the output's path
    dtype: str  # of the shipped weights: float16 or float32
    half_error: float  # RMS change of ε from float16 weights, relative to ε's RMS
    size_bytes: int
    steps: int
    train_seconds: float | None
    config_hash: str
    config: dict[str, Any]
    data: dict[str, Any]
    machine: dict[str, Any]
    mlflow: dict[str, Any]
    quality_bar: list[dict[str, Any]]
    benchmark: dict[str, float]
    evaluation_hash: str
    evaluation_rows: int
    reference_config: bool  # every stage made with a shipped configs/train-reference*.yaml
    packed_at: str
    # The training runs in order, the first from scratch, each next one fine-tuning the export of
    # the one before (its config's init_from): run, steps, train_seconds, config_hash, config,
    # config_file (the configs/ file that remakes it, or None), mlflow. steps and train_seconds
    # above are their sums; config_hash, config and mlflow the last one's.
    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def machine() -> dict[str, Any]:
    """The CPU, cores and library versions of this machine (the README's "machine")."""
    import diffusers
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def _training(run_dir: Path) -> tuple[dict[str, Any], int, float | None]:
    """train.json, the export's step (recompose-training.json) and the run's time in steps."""
    record_path, export = run_dir / "train.json", run_dir / "export"
    if not record_path.is_file() or not (export / "recompose-training.json").is_file():
        raise ReferenceError(
            f"--run {run_dir}: not a finished training run (needs train.json and export/); "
            "run `recompose train` to the end first"
        )
    record = json.loads(record_path.read_text())
    exported = json.loads((export / "recompose-training.json").read_text())
    return record, int(exported["step"]), _step_time(record)


def stages(run_dir: Path) -> list[dict[str, Any]]:
    """The training runs that made ``run_dir``'s export, first to last: a run whose config has
    ``init_from`` naming another run's export (as given, relative to the working directory) is
    preceded by that run. A chain ending at a pipeline that is no run (a models:/ URI, the shipped
    reference) starts at the run that fine-tuned it; its config's init_from says from what."""
    chain: list[dict[str, Any]] = []
    seen: set[Path] = set()
    while run_dir not in seen:
        seen.add(run_dir)
        record, steps, seconds = _training(run_dir)
        config = record.get("config", {})
        chain.insert(
            0,
            {
                "run": _shown(run_dir),
                "steps": steps,
                "train_seconds": seconds,
                "config_hash": record["config_hash"],
                "config": config,
                "config_file": shipped_config(config),
                "mlflow": record["mlflow"],
            },
        )
        init = config.get("init_from")
        parent = Path(init).resolve().parent if init else None
        if parent is None or Path(init).name != "export" or not (parent / "train.json").is_file():
            break
        run_dir = parent
    return chain


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when under it (as commands are usually given)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _step_time(record: dict[str, Any]) -> float | None:
    """The run's seconds in optimizer steps (``step_seconds``) from its MLflow history."""
    seconds = None
    try:
        from mlflow import MlflowClient

        client = MlflowClient(record["mlflow"]["tracking_uri"])
        history = client.get_metric_history(record["mlflow"]["run_id"], "step_time_s")
        seconds = step_seconds([(m.step, m.value) for m in sorted(history, key=lambda m: m.timestamp)])
    except Exception as e:  # noqa: BLE001 - the store may have moved; the training time is then unknown
        log.warning("could not read the training run's step times from MLflow (%s)", e)
    return seconds


def step_seconds(history: list[tuple[int, float]]) -> float | None:
    """Seconds the run spent in optimizer steps, from its logged ``step_time_s`` (the mean step
    time of each window, logged at the window's last step): the windows' sums. Start-up, sample
    grids, checkpoints and the time between a stop and its resume are left out, so a run trained
    in several sittings is timed as one. ``history``: (step, mean) in the order logged; a window
    logged again after a resume from an earlier checkpoint counts once, as logged last."""
    by_step = dict(history)
    if not by_step:
        return None
    total, previous = 0.0, 0
    for step, mean in sorted(by_step.items()):
        total += mean * (step - previous)
        previous = step
    return round(total, 1)


def shipped_config(config: dict[str, Any]) -> str | None:
    """The ``configs/train-reference*.yaml`` whose config a run recorded (on the same data), so that
    the README's ``recompose train --config`` with it remakes the run; None when none is."""
    from pipelines.config import ConfigError, from_dict, load_config, to_dict
    from pipelines.train.config import TrainConfig

    if not config:
        return None
    try:
        recorded = to_dict(from_dict(TrainConfig, config), outputs_only=True)  # as the code reads it now
    except ConfigError:
        return None
    for path in sorted(CONFIGS.glob("train-reference*.yaml")):
        try:
            cfg = load_config(TrainConfig, path, {"data": config.get("data", ""), "output": "unused"})
        except ConfigError:
            continue
        if to_dict(cfg, outputs_only=True) == recorded:
            return f"configs/{path.name}"
    return None


def half_error(unet: Any) -> float:
    """RMS change of ε when ``unet``'s weights are rounded to float16, relative to ε's RMS, on a
    fixed random batch with every condition present (computed in float32)."""
    import torch

    from models import random_inputs

    x0, cond, presence = random_inputs(unet, 4, torch.Generator().manual_seed(0))
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 600, 300, 50])
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        ref = unet(x, t, conditions=cond, presence=presence)
        unet.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in state.items()})
        got = unet(x, t, conditions=cond, presence=presence)
        unet.load_state_dict(state)
    return float((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def _write_pipeline(export: Path, out: Path) -> tuple[str, float]:
    """export -> out (model_index.json, scheduler/, unet/), float16 when lossless enough."""
    import torch

    from pipelines.diffusion.loading import load_pipeline

    pipe = load_pipeline(str(export), "cpu")
    err = half_error(pipe.unet)
    dtype = "float16" if err <= HALF_TOLERANCE else "float32"
    log.info("float16 weights change ε by %.2e (RMS, relative); shipping %s", err, dtype)
    if dtype == "float16":
        pipe.unet.to(torch.float16)
    pipe.save_pretrained(str(out))
    return dtype, err


def _swap_in(tmp: Path, out: Path) -> None:
    """Replaces the pipeline files and records of ``out`` with ``tmp``'s; anything else stays."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (*PIPELINE_FILES, "evaluation", RECORD, "README.md"):
        old = out / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        if (tmp / name).exists():
            (tmp / name).rename(old)


def pack(
    run_dir: str | Path,
    data: str | Path,
    output: str | Path | None = None,
    synth: str | Path | None = None,
    rows: int = DEFAULT_ROWS,
) -> ReferenceResult:
    """Packs ``run_dir``'s export into ``output``, evaluates it on ``data``'s first ``rows`` rows
    and writes reference.json and README.md (module docstring). ``synth``: the `recompose synth`
    output ``data`` was decomposed from (its seed and count go into the README).
    """
    from pipelines.data.batches import open_data
    from pipelines.evaluate.config import EvalConfig
    from pipelines.evaluate.run import run_evaluate

    run_dir, out = Path(run_dir).resolve(), Path(output or REFERENCE_DIR).resolve()
    chain = stages(run_dir)
    last = chain[-1]
    seconds = [c["train_seconds"] for c in chain]
    spec = open_data(str(data))
    synth_record = None
    if synth is not None:
        path = Path(synth) / "synth.json"
        if not path.is_file():
            raise ReferenceError(f"--synth {synth}: no synth.json (not a `recompose synth` output)")
        synth_record = json.loads(path.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".reference-", dir=out.parent))
    try:
        dtype, err = _write_pipeline(run_dir / "export", tmp)
        name = REFERENCE_MODEL if out == REFERENCE_DIR.resolve() else str(out)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pipeline_dir(name)  # loads back through the same path the commands take
    with tempfile.TemporaryDirectory(prefix="reference-eval-") as work:
        # The defaults but the rows: `recompose evaluate --data DATA` measures the same (same hash).
        cfg = EvalConfig(model=name, data=str(data), output=str(Path(work) / "eval"), num_samples=rows)
        evaluation = run_evaluate(cfg)
        (out / "evaluation").mkdir(exist_ok=True)
        for f in EVAL_FILES:
            if (Path(cfg.output) / f).is_file():
                shutil.copy2(Path(cfg.output) / f, out / "evaluation" / f)
    bench = {k: v for k, v in evaluation.metrics.items() if k.startswith("caption/")}
    result = ReferenceResult(
        output=str(out),
        model=name,
        dtype=dtype,
        half_error=err,
        size_bytes=sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and "unet" in f.parts),
        steps=sum(c["steps"] for c in chain),
        train_seconds=None if None in seconds else round(sum(seconds), 1),
        config_hash=last["config_hash"],
        config=last["config"],
        data={
            "rows": spec.rows,
            "manifest_hash": spec.manifest_hash,
            "resolution": spec.resolution,
            "synth": synth_record and {k: synth_record[k] for k in ("count", "seed", "split", "resolution")},
            "synth_dir": None if synth is None else str(synth),
        },
        machine=machine(),
        mlflow=last["mlflow"],
        quality_bar=evaluation.quality_bar,
        benchmark=bench,
        evaluation_hash=evaluation.config_hash,
        evaluation_rows=evaluation.num_rows,
        reference_config=all(c["config_file"] for c in chain),
        packed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        stages=chain,
    )
    write_json(result.to_dict(), out / RECORD)
    (out / "README.md").write_text(readme(result, (out / "evaluation" / "results.md").read_text()))
    log.info("packed %s (%s, %.1f MB) into %s", run_dir, dtype, result.size_bytes / 1e6, out)
    return result


def readme(r: ReferenceResult, results_md: str) -> str:
    """The model's README: how to reproduce it, what it is, and its evaluation."""
    import yaml

    synth = r.data.get("synth") or {}
    count, seed = synth.get("count", r.data["rows"]), synth.get("seed", 0)
    hours = f"{r.train_seconds / 3600:.2f} h" if r.train_seconds else "unknown"
    m = r.machine
    where = f"{m['cpu']}, {m['cores']} cores" + (f", {m['gpu']}" if m.get("gpu") else ", no GPU")
    table = results_md.split("\n", 1)[1] if results_md.startswith("# ") else results_md
    data = r.config.get("data") or "runs/reference/decomposed"  # as the training run was given it
    synth_dir = r.data.get("synth_dir") or "runs/reference/synth"
    n = r.evaluation_rows
    rows = "" if n == DEFAULT_ROWS else f" --num-samples {n}"
    chain = r.stages
    trains, missing = [], []
    for k, c in enumerate(chain, 1):
        config = c["config_file"] or (f"CONFIG-{k}.yaml" if len(chain) > 1 else "CONFIG.yaml")
        if not c["config_file"]:
            missing.append(config)
        trains.append(
            f"recompose train --data {data} --output {c['run']} --config {config} --max-steps {c['steps']}"
        )
    train_lines = "\n".join(trains)
    first = chain[0]["config"].get("init_from")
    note = (
        "" if not first else (f"\nThe first training run fine-tuned `{first}` (its config's `init_from`).\n")
    )
    if missing:
        note += (
            f"\n({', '.join(missing)}: the training config of that run, in `reference.json`'s "
            "`stages`; no file in `configs/` matches it.)\n"
        )
    steps = " + ".join(str(c["steps"]) for c in chain) + (f" = {r.steps}" if len(chain) > 1 else "")
    configs = (
        ""
        if len(chain) == 1
        else (
            " (" + ", then ".join(f"`{c['config_hash']}`" for c in chain) + " in order; the last one's "
            "config below)"
        )
    )
    return f"""# The reference model

What `recompose generate`, `recompose serve` and `recompose evaluate` use when no `--model` is
given (`--model {REFERENCE_MODEL}`). It was made by the project's own jobs on the built-in
synthetic set; these commands reproduce it (the last one packs it here and evaluates it):

```bash
recompose synth --output {synth_dir} --count {count} --seed {seed}
recompose decompose --input {synth_dir} --output {data} --config configs/decompose-laptop.yaml
{train_lines}
recompose reference --run {chain[-1]["run"]} --data {data} --synth {synth_dir}{rows}
```
{note}
| | |
|---|---|
| training config hash | `{r.config_hash}`{configs} |
| data | {r.data["rows"]} synthetic images at {r.data["resolution"]} px, seed {seed} (manifest `{r.data["manifest_hash"]}`) |
| steps | {steps} |
| training time (in optimizer steps) | {hours} |
| machine | {where}; Python {m["python"]}, torch {m["torch"]}, diffusers {m["diffusers"]} |
| weights | {r.dtype} ({r.size_bytes / 1e6:.1f} MB; float16 moves ε by {r.half_error:.1e} RMS, relative) |
| packed | {r.packed_at} |

`reference.json` holds all of this and the resolved training config; `evaluation/` holds the
evaluation's files. To check the table below on your machine (same rows, seeds and settings):

```bash
recompose evaluate --data {data} --output runs/reference/eval{rows}
```

## Training config (output-affecting part)

```yaml
{yaml.safe_dump(r.config, sort_keys=False).rstrip()}
```

{table}"""
