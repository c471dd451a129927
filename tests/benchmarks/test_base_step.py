"""``benchmarks/base_step.py`` on the CPU at the tiny size: the JSON's figures and ratios (online
encoding included), the modes' trainable parts, errors. No timing assertions."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import pytest
import torch

from benchmarks import base_step

VARIANT_KEYS = ("trainable_parameters", "total_parameters", "images_per_s", "step_s", "peak_memory_gib")


@pytest.fixture(scope="module")
def tiny_run() -> dict:
    # Each variant runs in a fresh process (its own peak RSS); one thread each: beside other work
    # on the 2-core VM, two threads ran tiny steps several times slower than one.
    # The adapter's parts are checked in-process (test_trainable_parts), not here: one process less.
    argv = ["--size", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--repeats", "1"]
    argv += ["--variants", "plain", "full", "full_online"]
    out, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out):
            assert base_step.main([*argv, "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)  # main sets this process's too
    return json.loads(out.getvalue())


@pytest.mark.slow
def test_figures(tiny_run):
    for key in ("size", "batch", "device", "precision", "variants", "ratios", "goal_ratio", "goal_met"):
        assert key in tiny_run, key
    assert (tiny_run["size"], tiny_run["batch"], tiny_run["precision"]) == ("tiny", 1, "fp32")
    assert tiny_run["resolution"] == 64 and tiny_run["latents"] == [4, 8, 8]
    runs = tiny_run["variants"]
    assert set(runs) == {"plain", "full", "full_online"}
    for name, run in runs.items():
        for key in VARIANT_KEYS:
            assert key in run, (name, key)
        assert run["images_per_s"] > 0 and run["peak_memory_gib"] > 0, name
        assert run["process_peak_memory_gib"] >= run["peak_memory_gib"], name
        # ru_maxrss and the RSS read at start come from different kernel counters (shared pages
        # count in one, not always in the other): both positive, not ordered
        assert run["process_peak_memory_gib"] > 0 and run["rss_at_start_gib"] > 0, name
        assert torch.isfinite(torch.tensor(run["final_loss"])), name
        assert run["flops_per_step"] is None and run["mfu"] is None, name  # counted on CUDA only
    # Every parameter trains in plain, full and full_online; the encoders of the last are frozen
    # and apart from the model.
    for name in ("plain", "full"):
        assert runs[name]["trainable_parameters"] == runs[name]["total_parameters"], name
    for key in ("trainable_parameters", "total_parameters"):
        assert runs["full_online"][key] == runs["full"][key], key
    assert runs["full"]["total_parameters"] > runs["plain"]["total_parameters"]
    encoders = runs["full_online"]["online_encoder_parameters"]
    assert set(encoders) == {"vae", "text_encoder"} and min(encoders.values()) > 0
    assert "online_encoder_parameters" not in runs["full"]
    # the goal is against plain; precomputed over online has none
    assert set(tiny_run["ratios"]) == {"full/plain", "full/full_online"}
    assert set(tiny_run["goal_met"]) == {"full/plain"}
    for key, ratio in tiny_run["ratios"].items():
        assert isinstance(ratio, float) and ratio > 0, key
        name, reference = key.split("/")
        assert ratio == pytest.approx(runs[name]["images_per_s"] / runs[reference]["images_per_s"], rel=1e-2)
    assert tiny_run["goal_met"]["full/plain"] == (tiny_run["ratios"]["full/plain"] >= base_step.GOAL_RATIO)


@pytest.mark.slow
def test_same_unet_in_every_variant(tiny_run):
    runs = tiny_run["variants"]
    plain, full = runs["plain"]["unet"], runs["full"]["unet"]
    assert plain["class_embed_type"] is None and full["class_embed_type"] == "identity"
    for key in ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels"):
        assert plain[key] == full[key] == runs["full_online"]["unet"][key], key


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trainable_parts(one_thread):
    """The adapter trains only the new paths, the same parameters with or without online encoding."""
    settings = base_step.StepSettings("tiny", steps=1, warmup=0, repeats=1)
    full, adapter, online = (
        base_step.run_variant(v, settings, torch.device("cpu")) for v in ("full", "adapter", "adapter_online")
    )
    assert 0 < adapter["trainable_parameters"] < full["trainable_parameters"] == full["total_parameters"]
    for key in ("trainable_parameters", "total_parameters"):
        assert adapter[key] == online[key], key
    assert adapter["total_parameters"] == full["total_parameters"]
    assert online["unet"] == adapter["unet"] == full["unet"]


@pytest.mark.parametrize("size", sorted(base_step.SIZES))
def test_online_encoders_make_the_precomputed_shapes(size):
    """Each size's VAE maps its images to the UNet's latents and its text encoder makes the
    caption states the composed model takes: what the online variants encode is what full reads."""
    spec = base_step.SIZES[size]
    vae, text, unet = spec.vae, spec.text_encoder, spec.unet
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    assert factor == spec.local_downsample and vae["sample_size"] == unet["sample_size"] * factor
    assert vae["latent_channels"] == unet["in_channels"]
    assert (text["max_position_embeddings"], text["hidden_size"]) == spec.context
    assert text["hidden_size"] == spec.sentence_dim == unet["cross_attention_dim"]


def test_lora_variant_trains_more_than_the_adapter(one_thread):
    settings = base_step.StepSettings("tiny", steps=1, warmup=0, repeats=1, lora_rank=4)
    adapter = base_step.run_variant("adapter", settings, torch.device("cpu"))
    checkpointed = dataclasses.replace(settings, gradient_checkpointing=True)
    lora = base_step.run_variant("adapter_lora", checkpointed, torch.device("cpu"))
    assert adapter["total_parameters"] < lora["total_parameters"]
    assert adapter["trainable_parameters"] < lora["trainable_parameters"] < lora["total_parameters"]
    # the LoRA weights are all that is added, and all of them train
    added = lora["total_parameters"] - adapter["total_parameters"]
    assert lora["trainable_parameters"] - adapter["trainable_parameters"] == added


def test_gpu_suite_without_cuda_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert base_step.main(["--gpu-suite", "--threads", str(torch.get_num_threads())]) == 2
    assert "error" in json.loads(capsys.readouterr().out)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown size"):
        base_step.StepSettings("sdxl")
    with pytest.raises(ValueError, match="batch"):
        base_step.StepSettings("tiny", batch=0)
    with pytest.raises(ValueError, match="lora-rank"):
        base_step.run_benchmark(base_step.StepSettings("tiny"), "cpu", ("adapter_lora",), threads=1)
