from __future__ import annotations

import os

import pytest

from tests.fixtures import block_network

# No test may touch the network: every hub lookup must be answered from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Refuse (and record) every connection and name lookup; an empty, offline HF cache.

    Tests that load weights assert the returned list stays empty.
    """
    import huggingface_hub.constants as hf_constants

    attempts = block_network(monkeypatch)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return attempts
