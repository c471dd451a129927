"""torch-fidelity's FID Inception v3 with seeded random weights, saved in the reference format
(a plain state dict named ``pt_inception-2015-12-05-6726825d.pth``), for the FID/KID tests."""

from __future__ import annotations

from pathlib import Path


def make_random_fid_inception(directory: str | Path, seed: int = 0) -> str:
    """Save the network into ``directory``; returns the file's path (``quality.inception_weights``)."""
    import torch
    from torch import nn
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from pipelines.evaluate.quality import INCEPTION_FILE

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the constructor's load; nothing to load yet
            return None

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    empty = directory / "empty.pth"
    torch.save({}, empty)  # with a path (even an empty one) the constructor never downloads
    torch.manual_seed(seed)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):  # He init keeps activations O(1) through ~50 conv layers
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = directory / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    empty.unlink()
    return str(path)
