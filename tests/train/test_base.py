"""``recompose train --base``: Composer on a pretrained Stable Diffusion pipeline, end to end on a
real local Ray (2 CPU workers: FSDP in full mode, DDP in adapter mode) with a tiny SD base in the real diffusers format
(tests/helpers/tiny_sd.py): the decomposition stores its latents and caption embeddings, both
modes train (the loss falls, a rerun resumes), the MLflow run is read back, the export carries the
base's VAE and text encoder, generates from every condition, edits exactly outside a mask, and
data from another VAE is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jobs.cli import main
from pipelines.data.synth import write_synth
from pipelines.decompose.config import DecomposeConfig
from pipelines.decompose.job import run_decompose
from tests.helpers.tiny_sd import make_tiny_sd

pytestmark = pytest.mark.slow

R = 32  # tiny SD: 8×8×4 latents
FAST = [
    "optim.batch_size=8",
    "optim.lr=1e-3",
    "optim.warmup_steps=1",
    "optim.ema_decay=0.9",
    "mlflow.log_every=1",
    "mlflow.sample_every=0",
    "mlflow.sample_rows=2",
    "mlflow.sample_steps=2",
    "mlflow.system_metrics=false",
    "checkpoint_every=4",
    "progress=false",
]
CONDITIONS = (
    "caption",
    "palette",
    "sketch",
    "depth",
    "intensity",
)  # no instances: their paths get no gradient


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local) -> dict:
    root = tmp_path_factory.mktemp("base")
    base = make_tiny_sd(root / "sd")
    write_synth(root / "synth", count=48, resolution=48, seed=0, split="train", progress=False)
    cfg = DecomposeConfig(
        input=str(root / "synth"),
        output=str(root / "data"),
        resolution=R,
        shard_size=24,
        conditions=CONDITIONS,
        base=base,
        progress=False,
    )
    run_decompose(cfg)
    # The same rows as if another VAE had made them: what training compares is the manifest's record
    other = root / "data-other"
    shutil.copytree(root / "data", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["extractors"]["latents"]["vae"]["sha256"] = "0" * 64
    manifest["extractors"]["latents"]["base"] = "another-sd"
    (other / "manifest.json").write_text(json.dumps(manifest))
    return {
        "root": root,
        "base": base,
        "uri": f"sqlite:///{root / 'mlflow.db'}",
        "data": root / "data",
        "data-other": other,
    }


def _train(s: dict, run: str, steps: int, *extra: str, data: str = "data") -> int:
    args = ["train", "--data", str(s[data]), "--output", str(s["root"] / run), "--base", s["base"]]
    args += ["--max-steps", str(steps), "--workers", "2"]
    for item in [*FAST, f"mlflow.tracking_uri={s['uri']}", "mlflow.registered_model=sd-test", *extra]:
        args += ["--set", item]
    return main(args)


def _losses(uri: str, run_dir: Path) -> list[float]:
    from mlflow import MlflowClient

    run_id = json.loads((run_dir / "train.json").read_text())["mlflow"]["run_id"]
    return [m.value for m in MlflowClient(uri).get_metric_history(run_id, "loss")]


@pytest.fixture(scope="module")
def full(setup) -> Path:
    """Full mode as a large base would train it: FSDP2 over the 2 workers, gradient checkpointing."""
    sharded = ("strategy=fsdp", "gradient_checkpointing=true")
    assert _train(setup, "full", 16, *sharded) == 0
    assert _train(setup, "full", 20, *sharded) == 0  # a rerun resumes at 16
    return setup["root"] / "full"


def test_full_mode_trains_resumes_and_logs(setup, full):
    from mlflow import MlflowClient

    losses = _losses(setup["uri"], full)
    assert len(losses) == 20  # one MLflow run over both commands
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    record = json.loads((full / "train.json").read_text())
    run = MlflowClient(setup["uri"]).get_run(record["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["base"] == setup["base"] and run.data.params["mode"] == "full"
    assert run.data.params["strategy"] == "fsdp"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (full / "export" / part).is_dir(), part
    index = json.loads((full / "export" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]


def test_adapter_mode_trains_only_the_new_paths(setup, full):
    from safetensors.torch import load_file

    from models.backbone import is_new_parameter

    assert _train(setup, "adapter", 8, "mode=adapter", "lora_rank=4", "optim.ema_decay=null") == 0
    after = load_file(
        str(setup["root"] / "adapter" / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    )
    start = load_file(str(Path(setup["base"]) / "unet" / "diffusion_pytorch_model.safetensors"))
    changed_new = 0
    for name, value in after.items():
        if not name.startswith("unet."):
            continue
        key = name.removeprefix("unet.").replace(".base_layer.", ".").replace("conv_in.base.", "conv_in.")
        if is_new_parameter(name):
            changed_new += int("lora_B" in name and value.abs().sum() > 0)
        else:
            assert key in start, name
            assert np.array_equal(value.float().numpy(), start[key].float().numpy()), name
    assert changed_new > 0  # LoRA moved; the base did not
    assert len(_losses(setup["uri"], setup["root"] / "adapter")) == 8


def test_the_export_generates_from_every_condition_and_edits_exactly(setup, full):
    from pipelines.data.shards import read_shard
    from pipelines.diffusion.pipeline import ComposerPipeline

    pipe = ComposerPipeline.from_pretrained(str(full / "export"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.image_size == R
    shard = sorted((setup["data"] / "shards").glob("*.parquet"))[0]
    row = {k: v[0] for k, v in read_shard(shard, ["image", "text", *CONDITIONS[1:]]).items()}
    image, text = row["image"], str(row["text"])
    images = {}
    for name in CONDITIONS:
        inputs = {"text": text} if name == "caption" else {name: row[name]}
        images[name] = pipe(inputs, num_inference_steps=3, seed=0).images[0]
        assert images[name].shape == (R, R, 3)
    assert len({im.tobytes() for im in images.values()}) == len(images)
    mask = np.zeros((R, R), np.uint8)
    mask[6:21, 3:17] = 1
    out = pipe({"text": text}, source=image, mask=mask, num_inference_steps=3, num_images=2)
    for im in out.images:
        np.testing.assert_array_equal(im[mask == 0], image[mask == 0])


def test_data_from_another_vae_or_without_latents_is_refused(setup, capsys):
    assert _train(setup, "mismatch", 2, data="data-other") != 0
    err = capsys.readouterr().err
    assert "another VAE" in err and "decompose again with --base" in err
    assert not (setup["root"] / "mismatch" / "train.json").exists()


def test_generate_and_evaluate_take_the_export(setup, full, tmp_path, monkeypatch):
    from PIL import Image

    from pipelines.data.shards import read_shard

    shard = sorted((setup["data"] / "shards").glob("*.parquet"))[0]
    image = read_shard(shard, ["image"])["image"][0]
    Image.fromarray(image).save(tmp_path / "in.png")
    args = ["generate", "--model", str(full / "export"), "--output", str(tmp_path / "gen"), "--steps", "2"]
    args += ["--text", "a red circle on a blue background", "--sketch-from", str(tmp_path / "in.png")]
    assert main(args) == 0
    assert len(list((tmp_path / "gen").rglob("*.png"))) >= 2
    # the registered version, by its models:/ URI: VAE, text encoder and tokenizer travel with it
    uri = json.loads((full / "export" / "recompose-training.json").read_text())["model_uri"]
    assert uri.startswith("models:/sd-test/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", setup["uri"])
    args = [
        "generate",
        "--model",
        uri,
        "--output",
        str(tmp_path / "gen-uri"),
        "--steps",
        "2",
        "--text",
        "a red star",
    ]
    assert main(args) == 0
    assert len(list((tmp_path / "gen-uri").rglob("*.png"))) >= 1
    args = ["evaluate", "--model", str(full / "export"), "--data", str(setup["data"])]
    args += ["--output", str(tmp_path / "eval"), "--num-samples", "2"]
    for item in ("steps=2", "batch_size=2", "benchmark.num_captions=2", "grid_rows=2", "progress=false"):
        args += ["--set", item]
    assert main(args) == 0
    result = json.loads((tmp_path / "eval" / "evaluate.json").read_text())
    metrics = result["metrics"]
    # no "all" subset: the data has no instances
    for key in (
        "caption/palette.chi2",
        "sketch/sketch.f1",
        "mask+caption/mask.max_abs_diff",
        "none/palette.chi2",
    ):
        assert key in metrics, key
    assert metrics["mask+caption/mask.max_abs_diff"] == 0  # masked rows exact through the VAE
    # the compositional benchmark ran: new captions as text, encoded by the export's text encoder
    assert any(b["metric"].startswith("benchmark.") for b in result["quality_bar"])
