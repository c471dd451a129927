"""eDiffi's ensemble of expert denoisers (pipelines/diffusion/ensemble.py): an ensemble of copies
of one model samples exactly that model's images; each expert runs only at the timesteps of its
interval and each step runs one expert; ``recompose ensemble`` checks and writes the directory
that every loader reads, on a pixel model and on a pretrained latent base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.cli import main
from pipelines.data.scene import render_sample
from pipelines.diffusion.ensemble import EnsembleError, ExpertEnsemble, assemble, plan, write_expert
from pipelines.diffusion.loading import ModelError, load_cascade, load_pipeline, pipeline_dir
from tests.helpers.cascade import save_stage

R = 16


def _perturb(directory: Path, scale: float = 0.05) -> None:
    """Another expert: the same model with every weight moved a little."""
    from safetensors.torch import load_file, save_file

    path = directory / "unet" / "diffusion_pytorch_model.safetensors"
    g = torch.Generator().manual_seed(1)
    weights = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in load_file(path).items()}
    save_file(weights, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ensemble")
    one = save_stage(root / "one", "tiny", R)
    same = root / "same"
    shutil.copytree(one, same)
    write_expert(same, (0, 400), "one")
    other = root / "other"
    shutil.copytree(one, other)
    _perturb(other)
    write_expert(other, (0, 400), "one")
    return {"root": root, "one": one, "same": same, "other": other}


def _sample(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    s = render_sample(0, "train", 2, R)
    args = dict(num_inference_steps=12, num_images=2, seed=3, guidance="text=3,sketch=2")
    sketch = (s.instances > 0).astype(np.uint8) * 255
    return pipe({"text": s.caption, "sketch": sketch}, **(args | kwargs)).images


def test_an_ensemble_of_copies_samples_the_models_images_bit_for_bit(models, tmp_path):
    out = tmp_path / "ensemble"
    index = assemble([str(models["one"]), str(models["same"])], [None, None], out, Path)
    assert [(e["name"], e["noise_range"]) for e in index["experts"]] == [
        ("expert-0", [400, 1000]),
        ("expert-1", [0, 400]),
    ]
    assert index["experts"][1]["unet"] == "experts/expert-1/unet" and not (out / "expert.json").exists()
    single, ens = load_pipeline(str(models["one"]), "cpu"), load_pipeline(str(out), "cpu")
    assert single.ensemble is None and isinstance(ens.ensemble, ExpertEnsemble)
    assert np.array_equal(_sample(single), _sample(ens))
    # masked editing and bidirectional guidance run the experts too
    s = render_sample(0, "train", 5, R)
    mask = np.zeros((R, R), np.uint8)
    mask[2:10, 4:12] = 1
    kw = dict(source=s.image, mask=mask, invert_conditions={"text": s.caption}, invert_guidance=1.0)
    a, b = _sample(single, **kw), _sample(ens, **kw)
    assert np.array_equal(a, b) and np.array_equal(a[0][mask == 0], s.image[mask == 0])
    # a cascade stage may be an ensemble: load_cascade attaches its experts
    assert load_cascade(str(out), "cpu").stages[0].ensemble is not None


def test_each_expert_runs_only_in_its_interval_and_one_per_step(models, tmp_path):
    out = tmp_path / "ensemble"
    assemble([str(models["other"]), str(models["one"])], [None, None], out, Path)
    ens, single = load_pipeline(str(out), "cpu"), load_pipeline(str(models["one"]), "cpu")
    calls: dict[str, list[int]] = {"single": []}

    def spy(model, key):
        forward = model.forward

        def wrapped(sample, timestep, *a, **k):
            calls.setdefault(key, []).append(int(timestep))
            return forward(sample, timestep, *a, **k)

        model.forward = wrapped

    for k, expert in enumerate(ens.ensemble.experts):
        spy(expert, f"expert-{k}")
    spy(single.unet, "single")
    images = _sample(ens, num_inference_steps=20)
    _sample(single, num_inference_steps=20)
    high, low = calls["expert-0"], calls["expert-1"]
    assert ens.ensemble.ranges == [(400, 1000), (0, 400)]
    assert high and low and all(400 <= t < 1000 for t in high) and all(0 <= t < 400 for t in low)
    # one forward per step, as the single model (every guidance branch is batched into it)
    assert len(high) + len(low) == len(calls["single"]) == 20
    assert not np.array_equal(images, _sample(single, num_inference_steps=20))  # the low expert acted


def test_the_cli_writes_an_ensemble_that_generate_loads(models, tmp_path, capsys):
    run = tmp_path / "run"  # a training run directory stands for its export
    shutil.copytree(models["other"], run / "export")
    (run / "train.json").write_text("{}")
    out = tmp_path / "ensemble"
    assert (
        main(
            [
                "ensemble",
                "--expert",
                str(run),
                "--expert",
                f"{models['one']}=400:1000",
                "--output",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    index = json.loads(capsys.readouterr().out)
    assert index["format"] == "recompose.ensemble/1" and index["num_train_timesteps"] == 1000
    assert index["from"] == {"expert-1": str(models["one"]), "expert-0": str(run)}
    assert json.loads((out / "ensemble.json").read_text()) == index
    args = ["generate", "--model", str(out), "--text", "a red circle", "--steps", "3"]
    assert main([*args, "--output", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "sample-0000.png").is_file()
    assert pipeline_dir(str(out)) == out


def test_bad_ensembles_are_refused_before_anything_is_written(models, tmp_path):
    one, other = str(models["one"]), str(models["other"])
    with pytest.raises(EnsembleError, match="overlap"):
        assemble([one, other], [(0, 600), None], tmp_path / "a", Path)
    with pytest.raises(EnsembleError, match="no noise range"):
        assemble([one, one], [None, None], tmp_path / "a", Path)
    with pytest.raises(EnsembleError, match="without an expert"):
        assemble([one, other], [(500, 1000), (0, 300)], tmp_path / "a", Path)
    with pytest.raises(EnsembleError, match="goes past"):
        assemble([one, other], [(400, 2000), None], tmp_path / "a", Path)
    bigger = save_stage(tmp_path / "bigger", "tiny", 2 * R)
    with pytest.raises(EnsembleError, match="another model"):
        assemble([one, str(bigger)], [None, (0, 400)], tmp_path / "a", Path)

    def scheduled(name: str, **changes) -> str:
        d = tmp_path / name
        shutil.copytree(models["other"], d)
        path = d / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return str(d)

    with pytest.raises(EnsembleError, match="another noise schedule"):
        assemble([one, scheduled("linear", beta_schedule="linear")], [None, (0, 400)], tmp_path / "a", Path)
    assert not (tmp_path / "a").exists()
    # the timesteps a sampler visits are not the noise schedule: the ensemble samples with those of
    # the expert of the highest noise (the directory it is written from)
    trailing = scheduled("trailing", timestep_spacing="trailing")
    for experts, ranges, want in (
        ([one, trailing], [(0, 400), (400, 1000)], "trailing"),
        ([trailing, one], [(0, 400), (400, 1000)], "leading"),
    ):
        assemble(experts, ranges, tmp_path / f"ens-{want}", Path)
        saved = json.loads((tmp_path / f"ens-{want}" / "scheduler" / "scheduler_config.json").read_text())
        assert saved["timestep_spacing"] == want
    assert main(["ensemble", "--expert", f"{one}=9:x", "--output", str(tmp_path / "b")]) == 2
    assert main(["ensemble", "--expert", one, "--expert", one, "--output", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()
    # a damaged ensemble directory is a clear error when loaded
    out = tmp_path / "c"
    assemble([one, other], [None, None], out, Path)
    shutil.rmtree(out / "experts")
    with pytest.raises(ModelError, match="expert-1's UNet experts/expert-1/unet is missing"):
        load_pipeline(str(out), "cpu")


def test_plan_fills_the_one_gap_and_the_ensemble_refuses_mixed_timesteps():
    assert plan([(0, 250), (250, 500), None], 1000, ["a", "b", "c"]) == [(0, 250), (250, 500), (500, 1000)]
    assert plan([None], 1000, ["a"]) == [(0, 1000)]  # one model: an ensemble of one
    with pytest.raises(EnsembleError, match="2 gaps"):
        plan([(200, 500), None], 1000, ["a", "b"])
    from models import build_model

    ens = ExpertEnsemble([build_model("tiny", sample_size=8)], [(0, 1000)])
    with pytest.raises(ValueError, match="one timestep for the whole batch"):
        ens.expert_at(torch.tensor([3, 700]))
    assert ens.expert_at(torch.tensor([5, 5])) == 0


def test_an_ensemble_on_a_pretrained_latent_base(tmp_path):
    from pipelines.conditions.backbone import load_base
    from tests.diffusion.test_base_pipeline import make_pipe
    from tests.helpers.tiny_sd import make_tiny_sd

    base = load_base(make_tiny_sd(tmp_path / "sd" / "base"))
    make_pipe(base).save_pretrained(str(tmp_path / "one"))
    shutil.copytree(tmp_path / "one", tmp_path / "low")
    write_expert(tmp_path / "low", (0, 500), None)
    assemble([str(tmp_path / "one"), str(tmp_path / "low")], [None, None], tmp_path / "ens", Path)
    single, ens = load_pipeline(str(tmp_path / "one"), "cpu"), load_pipeline(str(tmp_path / "ens"), "cpu")
    cond = {"text": "a red circle on a blue background"}
    for p in (single, ens):
        p.set_progress_bar_config(disable=True)
    a = single(cond, num_inference_steps=4, seed=2).images
    assert np.array_equal(a, ens(cond, num_inference_steps=4, seed=2).images)
