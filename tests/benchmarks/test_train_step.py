"""``benchmarks/train_step.py`` on the CPU: the JSON's figures, the baseline's architecture, errors."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import train_step


@pytest.fixture(scope="module")
def result() -> dict:
    # One thread: beside other work on the 2-core VM, two threads ran this 4× slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_step.run_step_benchmark(
            "tiny", batch=2, steps=2, warmup=1, device="cpu", dtype="float32", compile=False, repeats=1
        )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_figures(result):
    for key in ("preset", "batch", "device", "dtype", "compile", "ratio", "flops_ratio", "goal_met"):
        assert key in result, key
    assert (result["preset"], result["batch"], result["device"], result["dtype"]) == (
        "tiny",
        2,
        "cpu",
        "float32",
    )
    assert result["peak_bf16_tflops"] is None
    for name in ("ours", "theirs"):
        run = result[name]
        assert run["images_per_s"] > 0 and run["step_ms"] > 0, name
        assert run["flops_per_step"] > 0 and run["achieved_tflops"] > 0, name
        assert run["parameters"] > 0 and run["mfu"] is None, name
        assert torch.isfinite(torch.tensor(run["final_loss"])), name
    # Our encoders and local stems add work and parameters on top of the same UNet.
    assert result["ours"]["flops_per_step"] > result["theirs"]["flops_per_step"]
    assert result["ours"]["parameters"] > result["ours"]["unet_parameters"] > result["theirs"]["parameters"]
    assert result["ratio"] == pytest.approx(
        result["ours"]["images_per_s"] / result["theirs"]["images_per_s"], rel=1e-2
    )


@pytest.mark.slow
def test_baseline_is_the_same_unet_without_our_inputs(result):
    ours, theirs = result["ours"]["unet"], result["theirs"]["unet"]
    assert theirs["in_channels"] == 3 < ours["in_channels"]
    assert theirs["class_embed_type"] is None and ours["class_embed_type"] == "identity"
    for key in (
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
    ):
        assert theirs[key] == ours[key], key
    # Caption tokens, then semantics and palette tokens (tiny: 24 + 2 + 2), cross-attention width.
    assert result["context_shape"] == [2, 28, ours["cross_attention_dim"]]


def test_peak_table():
    assert train_step.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert train_step.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert train_step.peak_bf16_tflops("NVIDIA H200") == 989.4
    assert train_step.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert train_step.peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None


def test_gpu_suite_without_cuda_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_step.main(["--gpu-suite", "--threads", str(torch.get_num_threads())]) == 2
    assert "error" in json.loads(capsys.readouterr().out)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        train_step.run_step_benchmark("tiny", 2, 2, 1, "cpu", "float16", False, 1)
    with pytest.raises(ValueError, match="unknown model preset"):
        train_step.run_step_benchmark("huge", 2, 2, 1, "cpu", "float32", False, 1)
