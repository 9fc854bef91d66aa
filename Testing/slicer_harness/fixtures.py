"""pytest fixtures for the CoreDiffSlicer harness tests (import them into a test module)."""

import os
import time

import numpy as np
import pytest
import vtk

import sys

import slicer_harness as H

if H.REPO_ROOT not in sys.path:
    sys.path.insert(0, H.REPO_ROOT)

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="session")
def tinyModel(tmp_path_factory):
    """An untrained, tiny CLEAR-Net saved in the library's weights format (fast on 2 CPU cores)."""
    from CoreDiffLib.models import save_weights
    from CoreDiffLib.network import ClearNet, NetworkConfig
    import torch
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_weights(ClearNet(NetworkConfig(width=4, steps=2)), path, {"dose": "test"})
    return str(path)


@pytest.fixture
def slicerEnv(tmp_path):
    """A fresh stand-in Slicer (scene, app, temp dir) and the module imported into it."""
    tempDir = tmp_path / "slicer-temp"
    tempDir.mkdir()
    slicer = H.install(str(tempDir))
    module = H.loadModule()
    yield slicer, module, str(tempDir)
    for proc in H.launched:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    H.launched.clear()


def makeVolume(shape=(4, 64, 64), name="LDCT", seed=0, noiseSD=40.0):
    """A noisy water cylinder with oblique, anisotropic geometry; returns (node, ijkToRAS)."""
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    j, i = np.mgrid[0:nj, 0:ni]
    image = np.where(np.hypot(i - ni / 2, j - nj / 2) < ni * 0.42, 0.0, -1000.0)
    volume = (image[None] + rng.normal(0, noiseSD, shape)).astype(np.int16)
    m = vtk.vtkMatrix4x4()
    c, s = np.cos(0.3), np.sin(0.3)
    rows = [[c * 0.7, -s * 0.8, 0, -31.5], [s * 0.7, c * 0.8, 0, 12.25], [0, 0, 2.5, -140.0]]
    for r in range(3):
        for k in range(4):
            m.SetElement(r, k, rows[r][k])
    return H.volumeFromArray(volume, m, name), m


def spin(slicer, condition, timeout=60.0):
    """Process Qt events (QTimer polling) until condition() or timeout."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("condition not reached")
        slicer.app.processEvents()
        time.sleep(0.02)


def makeWidget(module, queries=False):
    """Create the module widget as Slicer does (parent given, then setup() and enter()).

    setup() starts `corediff models/devices --json` in the background; each costs a torch import
    (seconds on 2 cores), so unless ``queries`` they are cancelled at once (a cancel path too)."""
    widget = module.CoreDiffSlicerWidget(H.moduleWidgetParent())
    widget.setup()
    widget.parent.isEntered = True
    widget.enter()
    if not queries:
        for job in list(widget.logic._jobs):
            job.cancel()
        assert not widget.logic._jobs
    return widget


def waitIdle(slicer, widget, timeout=60.0):
    spin(slicer, lambda: not widget.logic._jobs, timeout)
