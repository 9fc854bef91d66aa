"""Shared fixtures: tiny models and small synthetic CT volumes written to disk."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from CoreDiffLib.models import save_weights  # noqa: E402
from CoreDiffLib.network import ClearNet, NetworkConfig  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def synthetic_ct(n_slices: int = 6, size: int = 64, seed: int = 0, noise_hu: float = 30.0) -> np.ndarray:
    """Air around a water-like ellipse with a bright 'bone' disc, plus Gaussian noise (HU)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    body = (xx / 0.42) ** 2 + (yy / 0.35) ** 2 < 1
    bone = (xx - 0.1) ** 2 + yy ** 2 < 0.06 ** 2
    vol = np.full((n_slices, size, size), -1000.0, np.float32)
    vol[:, body] = 40.0
    vol[:, bone] = 700.0
    vol += rng.normal(0, noise_hu, vol.shape).astype(np.float32)
    return vol


def write_image(path: Path, array: np.ndarray, spacing=(0.7, 0.8, 2.5), origin=(-10.0, 20.0, 30.0),
                direction=(1, 0, 0, 0, -1, 0, 0, 0, 1), dtype=np.int16) -> Path:
    img = sitk.GetImageFromArray(np.asarray(array).astype(dtype))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def write_dicom_series(folder: Path, hu: np.ndarray, uid: str, tags: dict[str, str] | None = None,
                       slice_mm: float = 2.0, shear_mm: float = 0.0) -> Path:
    """A DICOM CT series as a scanner writes it: one int16 file per slice, raw = HU + 1024
    (GDCM stores (value - intercept) / slope), and the given series-level ``tags``;
    ``shear_mm`` shifts each slice along y from the last, as a gantry tilt is stored."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.asarray(hu).round().astype(np.int16))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    common = {"0008|0060": "CT", "0028|1052": "-1024", "0028|1053": "1", "0020|000e": uid,
              "0020|0037": "1\\0\\0\\0\\1\\0", **(tags or {})}
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, val in {**common, "0020|0013": str(k + 1), "0020|0032": f"0\\{k * shear_mm}\\{k * slice_mm}",
                         "0008|0018": f"{uid}.{k + 1}"}.items():
            sl.SetMetaData(tag, val)
        writer.SetFileName(str(folder / f"{k}.dcm"))
        writer.Execute(sl)
    return folder


def dicom_positions(folder: Path) -> list[float]:
    """Each file's ImagePositionPatient z, in slice order."""
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    header = sitk.ImageFileReader()
    out = []
    for f in files:
        header.SetFileName(f)
        header.ReadImageInformation()
        out.append(float(header.GetMetaData("0020|0032").split("\\")[2]))
    return out


def write_study_folder(root: Path) -> np.ndarray:
    """A PACS-style export: one subfolder per series, a localizer, two reconstructions of the
    scan (soft-tissue and lung kernels), and an earlier CoreDiff output (derived, more slices).
    Returns the scan's HU (series 2); series 3 is its first 4 slices + 100 HU."""
    scan = synthetic_ct(6, 32, noise_hu=0).round()
    write_dicom_series(root / "S1_scout", scan[:1], "1.2.826.1.1",
                       {"0020|0011": "1", "0008|103e": "Topogram", "0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    write_dicom_series(root / "S2_abdomen", scan, "1.2.826.1.2",
                       {"0020|0011": "2", "0008|103e": "Abdomen 1.0 B30f", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
                        "0018|1210": "B30f", "0018|0050": "1"})
    write_dicom_series(root / "S3_lung", scan[:4] + 100, "1.2.826.1.3",
                       {"0020|0011": "3", "0008|103e": "Lung 1.0 B70f", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
                        "0018|1210": "B70f"})
    write_dicom_series(root / "S4_denoised", synthetic_ct(8, 32, noise_hu=0), "1.2.826.1.4",
                       {"0020|0011": "1002", "0008|103e": "CoreDiff denoised", "0008|0008": "DERIVED\\SECONDARY"})
    return scan


@pytest.fixture(autouse=True)
def _own_user_files(tmp_path_factory, tmp_path, monkeypatch):
    """A run's ONNX exports stay in its own temp folder (shared by its tests: an export is reused,
    as in use) and each test saves adaptations in its own home: nothing is read from or left in
    the user's ~/.cache/corediff or ~/.corediff, so results never depend on earlier runs.
    Subprocesses (the CLI) inherit these."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("COREDIFF_CACHE", str(base / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(base / "xdg-cache"))
    monkeypatch.setenv("COREDIFF_HOME", str(tmp_path / "corediff-home"))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A new width-8 CLEAR-Net weights file (fast). Its output layer starts at zero, so it returns its
    input: use ``changing_model_path`` where a test must see the network change the image."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_weights(ClearNet(NetworkConfig(width=8)), path)
    return path


@pytest.fixture(scope="session")
def changing_model_path(tmp_path_factory) -> Path:
    """A width-8 model whose last conv is random: a new network starts as the identity, this one
    changes the image, so tests can tell which planes or how many steps it ran."""
    torch.manual_seed(0)
    net = ClearNet(NetworkConfig(width=8))
    torch.nn.init.normal_(net.out.weight, std=0.05)
    path = tmp_path_factory.mktemp("models") / "changing.safetensors"
    save_weights(net, path)
    return path


@pytest.fixture(scope="session")
def identity_model_path(tmp_path_factory) -> Path:
    """A width-8 model whose last conv is zero: x0_hat = x_t, so denoising returns the input."""
    torch.manual_seed(0)
    net = ClearNet(NetworkConfig(width=8))
    torch.nn.init.zeros_(net.out.weight)
    torch.nn.init.zeros_(net.out.bias)
    path = tmp_path_factory.mktemp("models") / "identity.safetensors"
    save_weights(net, path)
    return path


@pytest.fixture(scope="session", autouse=True)
def compiler_cache_of_the_tests(tmp_path_factory):
    """torch makes its compiler's cache folder (/tmp/torchinductor_<user>) when a test (or a CLI
    it starts) loads the compiler, and leaves it: the tests' is in pytest's own temporary folder,
    which pytest keeps for its last three runs only, however a run ended."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("torchinductor"))


@pytest.fixture()
def ct_file(tmp_path) -> Path:
    return write_image(tmp_path / "ldct.nrrd", synthetic_ct())
