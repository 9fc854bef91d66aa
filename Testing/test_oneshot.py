"""One-shot learning (issue #5): step weights, losses, storage, CLI and bad input.

Everything runs on tiny images and a width-8 network so the file stays well under a minute.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import pytest
import torch
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from CoreDiffLib import CoreDiffError  # noqa: E402
from CoreDiffLib import oneshot  # noqa: E402
from CoreDiffLib.cli import main  # noqa: E402
from CoreDiffLib.intensity import hu_to_unit  # noqa: E402
from CoreDiffLib.io import Volume, read_volume, write_volume  # noqa: E402
from CoreDiffLib.models import load_model, save_weights, sha256_of  # noqa: E402
from CoreDiffLib.network import ClearNet, NetworkConfig  # noqa: E402
from CoreDiffLib.adaptations import (Adaptation, adaptation_base_model, combine_steps,  # noqa: E402
                                     list_adaptations, load_adaptation, model_identity, validate_name)
from CoreDiffLib.oneshot import adapt, fit_step_weights, texture_loss  # noqa: E402

T = 10


# ----------------------------------------------------------------------------- data
def phantom(n_slices: int = 6, size: int = 128, seed: int = 0) -> np.ndarray:
    """Body ellipse (soft tissue with texture), organs drifting along z, a bone disc (HU)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size * 2 - 1
    body = (xx / 0.9) ** 2 + (yy / 0.75) ** 2 < 1
    blobs = [(rng.uniform(-0.5, 0.5), rng.uniform(-0.4, 0.4), rng.uniform(0.1, 0.25),
              rng.uniform(0.1, 0.2), hu) for hu in (-90.0, 70.0, 110.0, 30.0)]
    tex = ndi.gaussian_filter(rng.normal(size=(n_slices, size, size)), (1.0, 2.0, 2.0))
    tex *= 15.0 / tex.std()
    vol = np.full((n_slices, size, size), -1000.0, np.float32)
    for z in range(n_slices):
        s = vol[z]
        s[body] = 40.0 + tex[z][body]
        for cx, cy, a, b, hu in blobs:
            s[(((xx - cx - 0.02 * z) / a) ** 2 + ((yy - cy) / b) ** 2 < 1) & body] = hu + tex[z][body].mean()
        s[((xx - 0.55) ** 2 + (yy + 0.1) ** 2 < 0.01) & body] = 700.0
    return vol


def noisy(vol: np.ndarray, sigma_hu: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = ndi.gaussian_filter(rng.normal(size=vol.shape), (0, 0.7, 0.7))
    return (vol + n * (sigma_hu / n.std())).astype(np.float32)


def step_stack(clean_hu: np.ndarray, seed: int = 0) -> torch.Tensor:
    """Synthetic per-step outputs (T, 1, H, W): noise falls step by step, then blur sets in,
    so step 5 is clearly the closest to the clean slice."""
    rng = np.random.default_rng(seed)
    noise = [120, 90, 70, 50, 30, 8, 8, 8, 8, 8]
    blur = [0, 0, 0, 0, 0, 0, 1.0, 1.6, 2.2, 3.0]
    out = []
    for k in range(T):
        x = ndi.gaussian_filter(clean_hu, blur[k]) if blur[k] else clean_hu.copy()
        n = ndi.gaussian_filter(rng.normal(size=x.shape), 0.7)
        out.append(x + n * (noise[k] / n.std()))
    return torch.from_numpy(hu_to_unit(np.stack(out).astype(np.float32)))[:, None]


def rmse_hu(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) * 4096.0).pow(2).mean().sqrt())


def tiny_model(seed: int = 0) -> ClearNet:
    """A width-8 CLEAR-Net whose residual output is scaled down: a near-identity denoiser whose
    T steps still differ, so sampling is cheap and every code path runs."""
    torch.manual_seed(seed)
    net = ClearNet(NetworkConfig(width=8))
    with torch.no_grad():  # small random residual head (whatever the library's own init is)
        net.out.weight.normal_(0.0, 0.02)
        net.out.bias.zero_()
    return net.eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest and does not fight other jobs for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def user_home(tmp_path, monkeypatch):
    home = tmp_path / "corediff_home"
    monkeypatch.setenv("COREDIFF_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny model and small NDCT / LDCT volumes on disk."""
    d = tmp_path_factory.mktemp("oneshot")
    model_path = d / "tiny.safetensors"
    save_weights(tiny_model(), model_path)
    other_path = d / "other.safetensors"
    save_weights(tiny_model(seed=1), other_path)
    clean = phantom(5, 64, seed=3)
    spacing = (0.8, 0.8, 2.0)
    paths = {"model": model_path, "other": other_path, "dir": d}
    for key, vol in (("ndct", noisy(clean, 10, 1)), ("ldct", noisy(clean, 60, 2))):
        paths[key] = write_volume(Volume(vol, spacing), d / f"{key}.nrrd")
    paths["ndct_spacing"] = write_volume(Volume(noisy(clean, 10, 1), (0.8, 0.8, 3.0)), d / "ndct_sp.nrrd")
    paths["ndct_shape"] = write_volume(Volume(noisy(clean[:4], 10, 1), spacing), d / "ndct_short.nrrd")
    paths["ndct_moved"] = write_volume(Volume(noisy(clean, 10, 1), spacing, (0.0, 0.0, 300.0)), d / "ndct_moved.nrrd")
    air = noisy(clean, 60, 2)
    air[0] = noisy(np.full_like(clean[:1], -1000.0), 60, 5)[0]  # a slice above the patient
    paths["ldct_air"] = write_volume(Volume(air, spacing), d / "ldct_air.nrrd")
    mr = np.abs(noisy(clean, 10, 1)) * 0.2 + 10  # MR-like: no air at -1000
    paths["mr"] = write_volume(Volume(mr.astype(np.float32), spacing), d / "mr.nrrd")
    return paths


# ----------------------------------------------------------------------------- weights
def test_weights_start_uniform_and_are_softmax_normalised():
    steps = step_stack(phantom(1, 64)[0])
    fit = fit_step_weights(steps, steps[5, 0], "paired", iterations=0)
    assert fit.logits == [0.0] * T
    a = Adaptation("u", "sha", None, "paired", 0, 0, T, fit.logits)
    assert np.allclose(a.probabilities, 1.0 / T)
    b = Adaptation("b", "sha", None, "paired", 0, 0, T, [0.3 * k for k in range(T)])
    p = np.array(b.probabilities)
    assert abs(p.sum() - 1.0) < 1e-9 and (p > 0).all()
    assert np.allclose(p, np.exp(b.weights) / np.exp(b.weights).sum())


def test_combine_is_the_weighted_sum_clamped():
    g = torch.Generator().manual_seed(0)
    steps = torch.rand(T, 2, 1, 16, 16, generator=g) * 1.2 - 0.1
    logits = torch.randn(T, generator=g).tolist()
    a = Adaptation("c", "sha", None, "paired", 0, 0, T, logits)
    w = torch.softmax(torch.tensor(logits), 0)
    expected = sum(w[k] * steps[k] for k in range(T))
    assert torch.allclose(combine_steps(steps, logits), expected, atol=1e-6)
    assert torch.allclose(a.combine(steps), expected.clamp(0, 1), atol=1e-6)
    assert a.combine(steps).shape == (2, 1, 16, 16)
    with pytest.raises(CoreDiffError, match="weighs 10 steps"):
        a.combine(steps[:5])
    for outside in (1.2, -0.2):  # the sampler's states are not clamped: a blend of them past [0, 1] is
        assert a.combine(torch.full((T, 1, 1, 4, 4), outside)).sub(min(max(outside, 0), 1)).abs().max() == 0


# ----------------------------------------------------------------------------- fitting
def test_paired_moves_weight_to_the_best_step_and_lowers_the_error():
    clean = phantom(1, 128, seed=5)[0]
    steps = step_stack(clean, seed=1)
    target = torch.from_numpy(hu_to_unit(clean))
    errors = [rmse_hu(steps[k, 0], target) for k in range(T)]
    assert int(np.argmin(errors)) == 5
    fit = fit_step_weights(steps, target, "paired", iterations=300, seed=0)
    p = torch.softmax(torch.tensor(fit.logits), 0)
    assert int(p.argmax()) == 5 and float(p[5]) > 3.0 / T
    uniform = rmse_hu(combine_steps(steps, torch.zeros(T))[0], target)
    learned = rmse_hu(combine_steps(steps, fit.logits)[0], target)
    assert learned < 0.6 * uniform
    assert fit.loss_final < fit.loss_uniform


def test_fit_is_deterministic_for_a_seed():
    clean = phantom(1, 128, seed=2)[0]
    steps = step_stack(clean, seed=2)
    target = torch.from_numpy(hu_to_unit(clean))
    for mode in ("paired", "unpaired"):
        a = fit_step_weights(steps, target, mode, iterations=60, patch_size=64, seed=4)
        b = fit_step_weights(steps, target, mode, iterations=60, patch_size=64, seed=4)
        c = fit_step_weights(steps, target, mode, iterations=60, patch_size=64, seed=5)
        assert a.logits == b.logits and a.history == b.history
        assert a.logits != c.logits


def test_unpaired_loss_tolerates_misalignment_and_still_lowers_the_error():
    vol = phantom(6, 128, seed=7)
    ndct = noisy(vol, 10, 3)  # a normal-dose scan has some noise of its own
    clean_ref = vol[2]
    steps = step_stack(clean_ref, seed=3)
    aligned = torch.from_numpy(hu_to_unit(ndct[2]))[None, None]
    shifted = torch.roll(aligned, shifts=(3, -2), dims=(2, 3))
    # the loss of the candidate blends barely moves when the target is shifted ...
    blends = [torch.zeros(T)] + [torch.eye(T)[k] * 4.0 for k in range(T)]
    outs = [combine_steps(steps, w)[None] for w in blends]
    tex_aligned = np.array([float(texture_loss(o, aligned)) for o in outs])
    tex_shifted = np.array([float(texture_loss(o, shifted)) for o in outs])
    spread = tex_aligned.max() - tex_aligned.min()
    assert np.abs(tex_shifted - tex_aligned).max() < 0.1 * spread
    assert int(np.argmin(tex_aligned)) == int(np.argmin(tex_shifted))
    # ... whereas MSE is dominated by the misalignment
    mse_aligned = np.array([float(((o - aligned) ** 2).mean()) for o in outs])
    mse_shifted = np.array([float(((o - shifted) ** 2).mean()) for o in outs])
    assert np.abs(mse_shifted - mse_aligned).max() > 0.3 * (mse_aligned.max() - mse_aligned.min())
    # fitted against a non-aligned slice (two slices away, anatomy moved), the blend is
    # closer to the truth than the uniform blend
    target = torch.from_numpy(hu_to_unit(ndct[4]))
    fit = fit_step_weights(steps, target, "unpaired", iterations=300, patch_size=64, seed=0)
    truth = torch.from_numpy(hu_to_unit(clean_ref))
    uniform = rmse_hu(combine_steps(steps, torch.zeros(T))[0], truth)
    learned = rmse_hu(combine_steps(steps, fit.logits)[0], truth)
    assert learned < 0.85 * uniform, (uniform, learned, torch.softmax(torch.tensor(fit.logits), 0))
    assert fit.loss_final < fit.loss_uniform


def test_unpaired_fidelity_anchor_rejects_a_biased_step():
    """Band energies ignore the mean: a step with the right texture but a +150 HU bias would
    win on texture alone; the low-pass fidelity to the (aligned) LDCT rejects it."""
    vol = phantom(6, 128, seed=8)
    ndct = noisy(vol, 10, 4)
    steps = step_stack(vol[2], seed=4)
    steps[5] += 150.0 / 4096.0
    ldct = torch.from_numpy(hu_to_unit(noisy(vol[2:3], 60, 5)[0]))
    target = torch.from_numpy(hu_to_unit(ndct[4]))
    truth = torch.from_numpy(hu_to_unit(vol[2]))
    kw = dict(iterations=300, patch_size=64, seed=0, guide_unit=ldct)
    plain = fit_step_weights(steps, target, "unpaired", **kw)
    anchored = fit_step_weights(steps, target, "unpaired", anchor_unit=ldct, **kw)
    p_plain = torch.softmax(torch.tensor(plain.logits), 0)
    p_anch = torch.softmax(torch.tensor(anchored.logits), 0)
    assert float(p_anch[5]) < 0.5 * float(p_plain[5])
    assert rmse_hu(combine_steps(steps, anchored.logits)[0], truth) < rmse_hu(combine_steps(steps, plain.logits)[0], truth)


def test_adapt_runs_the_sampler_once_and_records_everything():
    net = tiny_model()
    clean = phantom(4, 64, seed=1)
    ldct, ndct = noisy(clean, 60, 1), noisy(clean, 10, 2)
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    seen = []
    a = adapt(net, ldct, 3, ndct, mode="unpaired", name="u1", dose="10%", iterations=20,
              patch_size=64, progress=lambda d, n: seen.append((d, n)))
    assert len(calls) == T  # one T-step sampling of the reference slice, nothing more
    assert a.ndct_slice == 3 and a.reference_slice == 3  # 3 + 2 clamped to the last slice
    assert a.mode == "unpaired" and a.dose == "10%" and a.steps == T and len(a.weights) == T
    assert a.base_sha256 == model_identity(net)
    assert seen[0] == (0, T + 20) and seen[-1] == (T + 20, T + 20)
    b = adapt(net, ldct, 3, ndct, mode="unpaired", name="u1", dose="10%", iterations=20, patch_size=64)
    assert a.weights == b.weights
    assert adapt(net, ldct, 0, ndct, mode="unpaired", iterations=0, patch_size=64).ndct_slice == 2


# ----------------------------------------------------------------------------- storage
def test_save_load_round_trip_and_listing(user_home):
    net = tiny_model()
    a = Adaptation("dose10", model_identity(net), "10%", "paired", 4, 4, T,
                   [0.1 * k for k in range(T)], {"loss": "mse"})
    path = a.save()
    assert path == user_home / "adaptations" / "dose10.json"
    assert not [p for p in path.parent.iterdir() if p.name != "dose10.json"]  # no temp file left
    data = json.loads(path.read_text())
    assert data["format"] == "corediff-oneshot-v2" and len(data["weights"]) == T
    old = dict(data, format="corediff-oneshot-v1")  # weights over the x0 estimates: another blend
    (user_home / "old.json").write_text(json.dumps(old))
    with pytest.raises(CoreDiffError, match="earlier CoreDiff .*run 'corediff oneshot' again"):
        load_adaptation(user_home / "old.json", net)
    for ref in ("dose10", str(path)):
        b = load_adaptation(ref, net)
        assert b.weights == a.weights and b.mode == "paired" and b.dose == "10%"
    rows = list_adaptations()
    assert [r["name"] for r in rows] == ["dose10"]
    assert rows[0]["kind"] == "adaptation" and rows[0]["base_sha256"] == a.base_sha256
    assert set(rows[0]) >= {"name", "path", "kind", "description", "dose", "base_sha256"}


def test_refuses_another_model_or_another_T(tmp_path):
    net, other = tiny_model(0), tiny_model(1)
    a = Adaptation("x", model_identity(net), None, "paired", 0, 0, T, [0.0] * T)
    path = a.save(tmp_path / "x.json")
    with pytest.raises(CoreDiffError, match="another model"):
        load_adaptation(path, other)
    short = ClearNet(NetworkConfig(width=8, steps=5))
    b = Adaptation("y", model_identity(short), None, "paired", 0, 0, T, [0.0] * T)
    with pytest.raises(CoreDiffError, match="T=5"):
        load_adaptation(b.save(tmp_path / "y.json"), short)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CoreDiffError, match="cannot read"):
        load_adaptation(tmp_path / "bad.json", net)
    with pytest.raises(CoreDiffError, match="neither a file nor a saved adaptation"):
        load_adaptation("nosuch", net)


# ----------------------------------------------------------------------------- CLI
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_end_to_end(files, user_home, capsys, tmp_path):
    rc, out, err = run_cli(capsys, "oneshot", "--model", files["model"], "--ldct", files["ldct"],
                           "--slice", 2, "--ndct", files["ndct"], "--name", "d10", "--dose", "10%",
                           "--iterations", 40, "--progress", "lines")
    assert rc == 0, err
    lines = out.strip().splitlines()
    saved = user_home / "adaptations" / "d10.json"
    assert lines[-1] == f"RESULT {saved}"
    assert f"INFO wrote {saved}: corediff denoise IN OUT --adaptation d10 applies it" in lines
    progress = [tuple(map(int, line.split()[1:])) for line in lines if line.startswith("PROGRESS ")]
    assert progress[0] == (0, T + 40) and progress[-1] == (T + 40, T + 40)
    a = Adaptation.read(saved)
    assert a.mode == "paired" and a.dose == "10%" and a.reference_slice == a.ndct_slice == 2
    net = load_model(files["model"])
    assert a.base_sha256 == net.weights_sha256

    rc, out, err = run_cli(capsys, "oneshot", "--model", files["model"], "--ldct", files["ldct"],
                           "--slice", 1, "--ndct-unpaired", files["ndct"], "--ndct-slice", 4,
                           "--name", "u10", "--out", tmp_path / "u10.json", "--iterations", 30,
                           "--patch-size", 64, "--progress", "none")
    assert rc == 0, err
    u = Adaptation.read(tmp_path / "u10.json")
    assert u.mode == "unpaired" and u.ndct_slice == 4
    assert out.strip().splitlines()[-1] == f"RESULT {tmp_path / 'u10.json'}"

    # denoise uses it (by name and by file), and it changes the result vs no adaptation
    outs = {}
    for key, extra in (("plain", []), ("name", ["--adaptation", "d10"]),
                       ("file", ["--adaptation", tmp_path / "u10.json"])):
        dest = tmp_path / f"den_{key}.nrrd"
        rc, _, err = run_cli(capsys, "denoise", files["ldct"], dest, "--model", files["model"],
                             "--device", "cpu", "--progress", "none", *extra)
        assert rc == 0, err
        outs[key] = read_volume(dest).array
    assert not np.allclose(outs["plain"], outs["name"])

    rc, out, _ = run_cli(capsys, "models", "--json")
    assert rc == 0 and "d10" in [r["name"] for r in json.loads(out) if r["kind"] == "adaptation"]


def test_an_outdated_adaptation_is_listed_so_and_replaced_by_a_new_fit_of_its_name(files, user_home, capsys):
    """A v1 file (weights over the x0 estimates) cannot be used; it was listed as damaged, and
    refitting it under its name asked for --overwrite, which the Slicer wizard cannot pass."""
    old = user_home / "adaptations" / "d10.json"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_text(json.dumps({"format": "corediff-oneshot-v1", "name": "d10"}))
    rc, out, _ = run_cli(capsys, "models", "--json")
    row = [r for r in json.loads(out) if r["name"] == "d10"][0]
    assert rc == 0 and row["description"].startswith("outdated") and row["damaged"]
    rc, out, err = run_cli(capsys, "oneshot", "--model", files["model"], "--ldct", files["ldct"], "--slice", 2,
                           "--ndct", files["ndct"], "--name", "d10", "--iterations", 5, "--progress", "lines")
    assert rc == 0, err
    assert "made by an earlier CoreDiff and cannot be used any more: replacing it" in out
    assert Adaptation.read(old).mode == "paired"
    # a usable one saved under the name meanwhile (another run) is kept, not replaced as outdated
    fresh = Adaptation("d10", "sha", None, "unpaired", 0, 0, T, [0.0] * T)
    with pytest.raises(CoreDiffError, match="saved by another run meanwhile; kept it"):
        fresh.save(old, overwrite=False, replace_outdated=True)
    assert Adaptation.read(old).mode == "paired"
    # a file whose format is not even a string is listed as damaged: the listing does not fail
    (old.parent / "odd.json").write_text(json.dumps({"format": ["x"]}))
    rc, out, err = run_cli(capsys, "models", "--json")
    assert rc == 0 and [r for r in json.loads(out) if r["name"] == "odd"][0]["damaged"], err


def test_a_reference_stored_ras_gives_the_planes_denoise_runs(tmp_path):
    """One-shot fitted on the stored planes while denoise runs them in the LPS layout: the same
    scan stored two ways gave two adaptations, one fitted on states denoise never makes."""
    import SimpleITK as sitk
    from conftest import synthetic_ct

    from CoreDiffLib.inference import axial_view
    image = sitk.GetImageFromArray(synthetic_ct(3, 40, seed=4).astype(np.int16))
    image.SetSpacing((0.7, 0.8, 1.0))
    sitk.WriteImage(image, str(tmp_path / "lps.nrrd"))
    sitk.WriteImage(sitk.Flip(image, [True, True, False]), str(tmp_path / "ras.nrrd"))
    sitk.WriteImage(sitk.PermuteAxes(image, [1, 0, 2]), str(tmp_path / "swapped.nrrd"))
    lps, lps_xy = axial_view(read_volume(tmp_path / "lps.nrrd"))
    for name in ("ras", "swapped"):
        planes, xy = axial_view(read_volume(tmp_path / f"{name}.nrrd"))
        assert np.array_equal(planes, lps) and xy == pytest.approx(lps_xy), name


def test_cli_without_a_model_starts_from_the_shipped_model_of_the_nearest_dose(files, user_home, capsys, tmp_path):
    from CoreDiffLib.dose_estimate import shipped_choice
    rc, out, err = run_cli(capsys, "oneshot", "--ldct", files["ldct"], "--slice", 2, "--ndct", files["ndct"],
                           "--name", "auto-base", "--iterations", 5, "--patch-size", 32, "--progress", "lines")
    assert rc == 0, err
    _, models = shipped_choice()
    a = Adaptation.read(user_home / "adaptations" / "auto-base.json")
    assert a.info["model"] in models.values()  # one of the dose models, named in the log
    assert f"model for this scan: {a.info['model']}" in out or "using the default model" in out
    assert a.base_sha256 == load_model(a.info["model"]).weights_sha256


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("corediff: error: "), err
    return lines[0]


@pytest.mark.parametrize("case, match", [
    ("slice", "out of range"),
    ("negative_slice", "out of range"),
    ("shape", "differ in shape"),
    ("spacing", "spacing"),
    ("not_ct", "does not look like CT"),
    ("name", "path separators"),
    ("ndct_slice", "out of range"),
    ("ndct_slice_paired", "unpaired mode"),
    ("out_type", "ending in .json"),
    ("out_folder", "does not exist"),
    ("out_is_folder", "is a folder"),
    ("empty_ndct", "--ndct is empty"),
    ("patch_size", "--patch-size 0"),
    ("patch_size_negative", "--patch-size -5"),
    ("seed", "--seed -1"),
    ("ssim_nan", "--ssim-weight nan"),
    ("ssim_negative", "--ssim-weight -1"),
    ("dose_label", "--dose"),
    ("moved", "different places"),
    ("same_file", "are the same file"),
    ("swapped", "not quieter than the low-dose slice"),
    ("copied", "not quieter than the low-dose slice"),  # the low-dose scan again, under another name
    ("air_slice", "--slice 0 of"),
    ("iterations_0", "--iterations must be >= 1"),
    ("ssim_unpaired", "--ssim-weight is for paired mode"),
    ("unpaired_patch", "--patch-size: the unpaired texture loss needs at least 56 pixels"),
    ("unpaired_small_field", "(64x64 pixels of 0.5x0.5 mm: 40 of the LDCT's 0.8x0.8 mm pixels across): the unpaired "
                             "texture loss needs at least 56"),
])
def test_cli_bad_input_fails_cleanly_and_writes_nothing(files, user_home, capsys, tmp_path, case, match):
    args = {"--model": files["model"], "--ldct": files["ldct"], "--slice": 2, "--ndct": files["ndct"],
            "--name": "bad", "--iterations": 5}
    if case == "slice":
        args["--slice"] = 5
    elif case == "negative_slice":
        args["--slice"] = -1
    elif case == "shape":
        args["--ndct"] = files["ndct_shape"]
    elif case == "spacing":
        args["--ndct"] = files["ndct_spacing"]
    elif case == "not_ct":
        args["--ndct"] = files["mr"]
    elif case == "name":
        args["--name"] = "../evil"
    elif case == "ndct_slice":
        del args["--ndct"]
        args.update({"--ndct-unpaired": files["ndct"], "--ndct-slice": 9})
    elif case == "ndct_slice_paired":
        args["--ndct-slice"] = 1
    elif case == "out_type":
        args["--out"] = tmp_path / "a.nrrd"
    elif case == "out_folder":
        args["--out"] = tmp_path / "missing" / "a.json"
    elif case == "out_is_folder":
        (tmp_path / "dir.json").mkdir()
        args.update({"--out": tmp_path / "dir.json", "--overwrite": None})
    elif case == "empty_ndct":
        args["--ndct"] = ""
    elif case in ("patch_size", "patch_size_negative"):
        args["--patch-size"] = 0 if case == "patch_size" else -5
    elif case == "seed":
        args["--seed"] = -1
    elif case in ("ssim_nan", "ssim_negative"):
        args["--ssim-weight"] = "nan" if case == "ssim_nan" else -1
    elif case == "dose_label":
        args["--dose"] = "10%\nfake row"
    elif case == "moved":
        args["--ndct"] = files["ndct_moved"]
    elif case == "same_file":
        args["--ndct"] = files["ldct"]
    elif case == "swapped":
        args.update({"--ldct": files["ndct"], "--ndct": files["ldct"]})
    elif case == "copied":
        copy = files["dir"] / "ldct_copy.nrrd"
        copy.write_bytes(Path(files["ldct"]).read_bytes())
        args["--ndct"] = copy
    elif case == "air_slice":
        args.update({"--ldct": files["ldct_air"], "--slice": 0})
    elif case == "iterations_0":
        args["--iterations"] = 0
    elif case in ("ssim_unpaired", "unpaired_patch"):
        del args["--ndct"]
        args["--ndct-unpaired"] = files["ndct"]
        args.update({"--ssim-weight": 0.5} if case == "ssim_unpaired" else {"--patch-size": 32})
    elif case == "unpaired_small_field":  # 32 mm across: on the LDCT's grid, too few pixels for the texture loss
        del args["--ndct"]
        small = read_volume(files["ndct"]).array
        args["--ndct-unpaired"] = write_volume(Volume(small, (0.5, 0.5, 2.0)), files["dir"] / "ndct_small_field.nrrd")
    argv = ["oneshot"]
    for flag, value in args.items():
        argv += [flag] if value is None else [flag, str(value)]  # None: a switch
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert match in one_error_line(err)
    assert "RESULT" not in out
    assert not (user_home / "adaptations").exists() or not any((user_home / "adaptations").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_denoise_refuses_an_adaptation_of_another_model(files, capsys, tmp_path):
    other = load_model(files["other"])
    a = Adaptation("o", other.weights_sha256, None, "paired", 0, 0, T, [0.0] * T)
    path = a.save(tmp_path / "o.json")
    dest = tmp_path / "den.nrrd"
    rc, _, err = run_cli(capsys, "denoise", files["ldct"], dest, "--model", files["model"],
                         "--adaptation", path, "--device", "cpu", "--progress", "none")
    assert rc == 2 and "another model" in one_error_line(err)
    assert not dest.exists()


def test_an_adaptation_without_a_model_brings_its_own_base_model(files, capsys, tmp_path):
    """The default model changed once (2026-12-04): an adaptation of another model still works
    without --model, and one whose base is unknown is refused naming that base."""
    from CoreDiffLib.inference import Denoiser
    from CoreDiffLib.models import shipped_models
    other = load_model(files["other"])
    a = Adaptation("o", other.weights_sha256, None, "paired", 0, 0, T, [0.0] * T,
                   info={"model": str(files["other"]), "base_model": str(files["other"])})
    path = a.save(tmp_path / "o.json")
    assert adaptation_base_model(path) == str(files["other"])
    den = Denoiser.load(adaptation=path, device="cpu")  # model: the default, so the adaptation's base
    assert den.model.weights_sha256 == other.weights_sha256 and den.steps in (None, T)
    dest = tmp_path / "den.nrrd"
    rc, _, err = run_cli(capsys, "denoise", files["ldct"], dest, "--adaptation", path, "--device", "cpu",
                         "--progress", "none")
    assert rc == 0, err
    assert dest.exists()
    # a shipped base model is found by its sha256 alone
    name, entry = next(iter(shipped_models().items()))
    assert adaptation_base_model(Adaptation("s", entry["sha256"], None, "paired", 0, 0, T, [0.0] * T)) == name
    # a base that is neither shipped nor on disk any more: refused by name (the default is not tried)
    lost = Adaptation("l", "0" * 64, None, "paired", 0, 0, T, [0.0] * T, info={"model": "my-old-model"})
    assert adaptation_base_model(lost) is None
    rc, _, err = run_cli(capsys, "denoise", files["ldct"], tmp_path / "x.nrrd", "--adaptation",
                         lost.save(tmp_path / "l.json"), "--device", "cpu", "--progress", "none")
    assert rc == 2 and "was learned for my-old-model (sha256 000000000000" in one_error_line(err)
    assert "not installed here or has changed since the fit" in err
    assert not (tmp_path / "x.nrrd").exists()


def test_existing_adaptation_is_not_overwritten_without_flag(files, user_home, capsys):
    saved = Adaptation("keep", "sha", None, "paired", 0, 0, T, [0.0] * T).save()
    before = saved.read_text()
    rc, _, err = run_cli(capsys, "oneshot", "--model", files["model"], "--ldct", files["ldct"], "--slice", 2,
                         "--ndct", files["ndct"], "--name", "keep", "--iterations", 5, "--progress", "none")
    assert rc == 2 and "--overwrite" in one_error_line(err)
    assert saved.read_text() == before


def test_reference_slice_of_a_thick_series_is_its_own_context_as_denoise_runs_it():
    """From 4 mm apart `denoise` gives each slice itself as context; the one-shot fit must weigh
    the steps of that same input, not of one with neighbours."""
    torch.manual_seed(0)
    model = ClearNet(NetworkConfig(width=8)).eval()
    torch.nn.init.normal_(model.out.weight, std=0.05)
    volume = phantom(3, 64)
    volume[0] += 400.0  # a neighbour unlike the slice
    own = oneshot.reference_step_outputs(model, volume, 1, neighbours=False)
    alone = oneshot.reference_step_outputs(model, volume[1:2], 0)
    with_neighbours = oneshot.reference_step_outputs(model, volume, 1)
    assert own.shape == (model.config.steps, 1, 64, 64)
    assert torch.allclose(own, alone, atol=1e-6)
    assert (own - with_neighbours).abs().max() > 1e-4


def test_tampered_adaptations_are_refused_and_do_not_break_the_model_list(user_home, capsys):
    net = tiny_model()
    good = Adaptation("good", model_identity(net), "10%", "paired", 2, 2, T, [0.0] * T).to_dict()
    folder = user_home / "adaptations"
    folder.mkdir(parents=True)
    tampered = {"big": {"weights": [1e39] + [0.0] * (T - 1)},        # float32 softmax: NaN, an all-0 HU output
                "spread": {"weights": [1e300, -1e300] + [0.0] * (T - 2)},
                "text": {"weights": "0123456789"}, "bools": {"weights": [True] * T},
                "steps_text": {"steps": "10"}, "steps_float": {"steps": 10.9}, "no_name": {"name": None},
                "big_unshown": {"weights": [1e39] + [0.0] * (T - 1), "probabilities": None},  # no check to trip
                "no_format": {"format": None},  # any JSON with these fields is not an adaptation
                "no_steps": {"steps": 0, "weights": [], "probabilities": None}}  # crashed the list (no max)
    for name, change in tampered.items():
        (folder / f"{name}.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(CoreDiffError):
            Adaptation.read(folder / f"{name}.json")
    (folder / "steps_inf.json").write_text(json.dumps(good).replace('"steps": 10', '"steps": Infinity'))
    (folder / "nested.json").write_text("[" * 100000 + "]" * 100000)
    (folder / ".good.json.partial-1-abcdef.json").write_text(json.dumps(good))  # a cut-short write
    for name in ("steps_inf", "nested"):
        with pytest.raises(CoreDiffError):
            Adaptation.read(folder / f"{name}.json")
    (folder / "base_number.json").write_text(json.dumps({**good, "base_sha256": "0" * 64, "info": {"base_model": 7}}))
    assert adaptation_base_model(folder / "base_number.json") is None  # a number is no file: no traceback
    (folder / "good.json").write_text(json.dumps(good))
    rc, out, _ = run_cli(capsys, "models", "--json")
    rows = [r for r in json.loads(out) if r["kind"] == "adaptation"]
    assert rc == 0 and [r["name"] for r in rows if not r.get("damaged")] == ["base_number", "good"]
    damaged = [r for r in rows if r.get("damaged")]  # listed, so a name they hold is no mystery
    assert sorted(r["name"] for r in damaged) == sorted([*tampered, "steps_inf", "nested"])
    assert all("damaged, cannot be used" in r["description"] and r["path"] in r["description"] for r in damaged)


def test_an_adaptation_saved_meanwhile_is_kept_and_an_explicit_model_is_kept(files, tmp_path):
    net = tiny_model()
    a = Adaptation("race", model_identity(net), None, "paired", 2, 2, T, [0.0] * T)
    out = tmp_path / "race.json"
    out.write_text("another run's adaptation")
    with pytest.raises(CoreDiffError, match="saved by another run meanwhile"):
        a.save(out, overwrite=False)
    assert out.read_text() == "another run's adaptation" and [p.name for p in tmp_path.iterdir()] == ["race.json"]
    a.save(out)  # --overwrite
    assert Adaptation.read(out).name == "race"
    from CoreDiffLib.inference import Denoiser
    adapted = Adaptation("tiny", load_model(files["model"]).weights_sha256, None, "paired", 2, 2, T, [0.0] * T)
    adapted.info["base_model"] = str(files["model"])
    adapted.save(tmp_path / "tiny.json")
    assert Denoiser.load(None, "cpu", adaptation=tmp_path / "tiny.json").model.weights_sha256 == adapted.base_sha256
    with pytest.raises(CoreDiffError, match="another model"):  # an explicit model is not swapped for the base
        Denoiser.load("default", "cpu", adaptation=tmp_path / "tiny.json")


def test_a_sagittally_stored_reference_is_adapted_in_its_axial_planes(files, user_home, capsys, tmp_path):
    """--slice counts axial planes, as denoise runs them, however the series is stored."""
    def sagittal(key):
        v = np.tile(read_volume(files[key]).array, (4, 1, 1))  # 20 axial slices: sagittal planes of 64 x 20
        # (z, y, x) -> stored with index axis k along x: array (x, y, z), direction columns (z, y, x)
        return write_volume(Volume(np.ascontiguousarray(np.transpose(v, (2, 1, 0))), (2.0, 0.8, 0.8),
                                   direction=(0, 0, 1, 0, 1, 0, 1, 0, 0)), tmp_path / f"{key}_sag.nrrd")
    ldct, ndct = sagittal("ldct"), sagittal("ndct")
    base = ["oneshot", "--model", str(files["model"]), "--ldct", str(ldct), "--ndct", str(ndct), "--iterations", "3"]
    rc, _, err = run_cli(capsys, *base, "--slice", "30", "--name", "sag_bad")  # a stored plane, not an axial one
    assert rc == 2 and "out of range 0..19" in err
    rc, out, err = run_cli(capsys, *base, "--slice", "2", "--name", "sag")
    assert rc == 0, err
    assert Adaptation.read(out.strip().splitlines()[-1].split(" ", 1)[1]).reference_slice == 2


def test_a_name_with_a_final_newline_is_refused_and_the_base_model_is_found_from_anywhere(tmp_path, monkeypatch):
    """'$' let 'name\\n' through (a file 'name⏎.json'); a relative --model path was recorded as
    given, so the adaptation could not find its model from another folder."""
    from CoreDiffLib.models import load_model, save_weights
    from CoreDiffLib.network import ClearNet, NetworkConfig
    with pytest.raises(CoreDiffError):
        validate_name("abc\n")
    assert validate_name("abc") == "abc"
    save_weights(ClearNet(NetworkConfig(width=4)), tmp_path / "m.safetensors")
    monkeypatch.chdir(tmp_path)
    assert load_model("m.safetensors").weights_path == str(tmp_path / "m.safetensors")


def test_an_adaptation_is_named_by_its_file_and_read_as_written(files, user_home, capsys, tmp_path):
    """A copied or --out file keeps the name given at the fit inside: outputs and errors name
    the file a run used. A newer CoreDiff's file is not called damaged (nor to be deleted), and a
    hand edit of the informational probabilities is refused rather than silently ignored."""
    net = load_model(files["model"])
    a = Adaptation("t1", net.weights_sha256, None, "paired", 2, 2, T, [0.0] * (T - 1) + [2.0],
                   info={"base_model": str(files["model"])})
    copy = a.save(tmp_path / "renamed.json")
    dest = tmp_path / "out.nrrd"
    rc, _, err = run_cli(capsys, "denoise", files["ldct"], dest, "--adaptation", copy, "--device", "cpu",
                         "--progress", "none")
    assert rc == 0, err
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(dest))
    reader.ReadImageInformation()
    assert reader.GetMetaData("corediff_adaptation") == "renamed"
    assert reader.GetMetaData("corediff_adaptation_sha256") == sha256_of(copy)
    wrong = {**a.to_dict(), "weights": [0.0] * (T - 1)}
    (tmp_path / "w9.json").write_text(json.dumps(wrong))
    with pytest.raises(CoreDiffError, match=r"w9\.json: adaptation 't1' has 9 weights"):
        Adaptation.read(tmp_path / "w9.json")
    edited = a.to_dict()
    edited["probabilities"] = [1.0] + [0.0] * (T - 1)
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(CoreDiffError, match="'probabilities' disagree with its 'weights'"):
        Adaptation.read(tmp_path / "edited.json")
    folder = user_home / "adaptations"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "future.json").write_text(json.dumps({**a.to_dict(), "format": "corediff-oneshot-v3"}))
    with pytest.raises(CoreDiffError, match="made by a newer CoreDiff .*update CoreDiff"):
        Adaptation.read(folder / "future.json")
    rc, out, _ = run_cli(capsys, "models", "--json")
    row = next(r for r in json.loads(out) if r["name"] == "future")
    assert row["damaged"] and "cannot be used by this version" in row["description"]
    assert "delete" not in row["description"]


def test_a_paired_reference_may_be_the_one_normal_dose_slice_placed_where_it_lies(files, user_home, capsys, tmp_path):
    """One-shot needs one normal-dose slice: a file of that slice alone, placed where it lies in
    the scan, is found on the LDCT's grid (it was refused as 'differ in shape')."""
    whole = read_volume(files["ndct"])
    origin = np.asarray(whole.origin) + 2 * whole.spacing[2] * np.reshape(whole.direction, (3, 3))[:, 2]
    alone = write_volume(Volume(whole.array[2:3], whole.spacing, tuple(origin), whole.direction), tmp_path / "s2.nrrd")
    common = ["oneshot", "--model", files["model"], "--ldct", files["ldct"], "--ndct", alone, "--iterations", 20,
              "--progress", "none"]
    rc, _, err = run_cli(capsys, *common, "--slice", 3, "--name", "wrong")
    assert rc == 2 and "lies at --ldct slice 2, not at --slice 3: give --slice 2" in one_error_line(err)
    rc, _, err = run_cli(capsys, *common, "--slice", 2, "--name", "alone")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "oneshot", "--model", files["model"], "--ldct", files["ldct"], "--ndct", files["ndct"],
                         "--iterations", 20, "--progress", "none", "--slice", 2, "--name", "whole")
    assert rc == 0, err
    a, b = (Adaptation.read(user_home / "adaptations" / f"{n}.json") for n in ("alone", "whole"))
    np.testing.assert_allclose(a.weights, b.weights, atol=1e-6)  # the same target slice: the same fit
    for shift, name in ((0.2, "rounded"), (0.9, "off")):  # positions rounded by an export pass; 0.9 mm is elsewhere
        moved = write_volume(Volume(whole.array[2:3], whole.spacing, tuple(origin + shift), whole.direction),
                             tmp_path / f"{name}.nrrd")
        rc, _, err = run_cli(capsys, "oneshot", "--model", files["model"], "--ldct", files["ldct"], "--ndct", moved,
                             "--slice", 2, "--name", name, "--iterations", 5, "--progress", "none")
        assert (rc == 0) == (shift < 0.5), err
    assert "is not a slice of the --ldct scan" in one_error_line(err)


def test_an_unpaired_reference_noisier_than_the_low_dose_slice_is_a_note_not_a_refusal(files, user_home, capsys,
                                                                                          tmp_path):
    """Another patient's, or thinner, normal-dose slices may measure noisier for reasons of their
    own: unpaired mode says so and fits; paired mode (the same voxels) refuses."""
    rc, out, err = run_cli(capsys, "oneshot", "--model", files["model"], "--ldct", files["ndct"], "--slice", 1,
                           "--ndct-unpaired", files["ldct"], "--name", "u", "--out", tmp_path / "u.json",
                           "--iterations", 5, "--patch-size", 64, "--progress", "none")
    assert rc == 0, err
    assert "note: the normal-dose reference is not quieter than the low-dose slice" in out + err


def test_denoising_with_an_adaptation_applies_the_blend_it_fitted():
    """The blend denoise applies is the fitted one, in the fitted order: softmax(weights) over
    the sampler's states, first step first (a reversed order passed every other test)."""
    from CoreDiffLib.inference import Denoiser, context_stack
    from CoreDiffLib.diffusion import sample
    net = tiny_model(seed=2)
    torch.nn.init.normal_(net.out.weight, std=0.05)  # states that differ from step to step
    vol = noisy(phantom(3, 64, seed=4), 40, 3)
    logits = [float(k) / 3 for k in range(T)]  # weights rising with the step: not symmetric
    a = Adaptation("order", model_identity(net), None, "paired", 1, 1, T, logits)
    den = Denoiser.load(net, "cpu", adaptation=a, runtime="eager", precision="fp32")
    got = den.denoise_batch(context_stack(vol, 0, 3))
    with torch.no_grad():
        steps = sample(net.eval(), torch.from_numpy(context_stack(vol, 0, 3))).steps
    probs = torch.softmax(torch.tensor(logits), 0)
    want = torch.einsum("k,kbchw->bchw", probs, steps).clamp(0, 1)[:, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    reversed_blend = torch.einsum("k,kbchw->bchw", probs.flip(0), steps).clamp(0, 1)[:, 0].numpy()
    assert np.abs(reversed_blend - want).max() > 1e-3  # the test can tell the order


def test_the_ssim_term_and_the_seed_reach_the_fit_and_the_unpaired_slice_defaults_two_on(files, user_home, capsys):
    """--ssim-weight and --seed silently dropped, or the unpaired normal-dose slice defaulting to the
    next one (the reference code takes the slice two further on), passed every test."""
    clean = phantom(1, 128, seed=5)[0]
    steps = step_stack(clean, seed=1)
    target = torch.from_numpy(hu_to_unit(clean)).float()
    plain, with_ssim = (fit_step_weights(steps, target, "paired", iterations=30, seed=0, ssim_weight=w).logits
                        for w in (0.0, 0.5))
    assert np.abs(np.subtract(plain, with_ssim)).max() > 0.3  # 1.43 measured; 0.03 when the term is dropped
    rc, _, err = run_cli(capsys, "oneshot", "--model", files["model"], "--ldct", files["ldct"], "--slice", 2,
                         "--ndct", files["ndct"], "--name", "ssim3", "--iterations", 5, "--ssim-weight", 0.5,
                         "--seed", 3, "--progress", "none")
    assert rc == 0, err
    info = Adaptation.read(user_home / "adaptations" / "ssim3.json").info
    assert info["seed"] == 3 and "ssim" in str(info["loss"]).lower(), info
    rc, _, err = run_cli(capsys, "oneshot", "--model", files["model"], "--ldct", files["ldct"], "--slice", 1,
                         "--ndct-unpaired", files["ndct"], "--name", "next2", "--iterations", 5, "--patch-size", 64,
                         "--progress", "none")
    assert rc == 0, err
    assert Adaptation.read(user_home / "adaptations" / "next2.json").ndct_slice == 3


def test_the_command_fits_a_thick_series_on_the_states_denoise_blends(files, user_home, capsys, tmp_path, monkeypatch):
    """Only the library was tested: `corediff oneshot` could fit 5 mm slices with neighbours as
    context, states that `denoise`, which gives each such slice itself, never blends."""
    contexts = []
    real = oneshot.reference_step_outputs

    def recorded(*args, **kwargs):
        contexts.append(kwargs.get("neighbours", True))
        return real(*args, **kwargs)
    monkeypatch.setattr(oneshot, "reference_step_outputs", recorded)
    clean = phantom(5, 64, seed=3)
    thick = {key: write_volume(Volume(noisy(clean, sd, seed), (0.8, 0.8, 5.0)), tmp_path / f"{key}5mm.nrrd")
             for key, sd, seed in (("ndct", 10, 1), ("ldct", 60, 2))}
    for volumes, name in ((thick, "thick"), (files, "thin")):
        rc, _, err = run_cli(capsys, "oneshot", "--model", files["model"], "--ldct", volumes["ldct"], "--slice", 2,
                             "--ndct", volumes["ndct"], "--name", name, "--iterations", 3, "--progress", "none")
        assert rc == 0, err
    assert contexts == [False, True]  # 5 mm: each slice its own context; 2 mm: its neighbours


def test_an_unpaired_normal_dose_slice_of_another_grid_is_put_on_the_low_dose_grid(files, user_home, capsys,
                                                                                     tmp_path):
    """Its patches were read in proportion across it at its own pixel size: on phantoms a 0.75x
    matrix fitted a blend of 18.8 HU RMSE where no adaptation gave 10.6 (docs/benchmarks/oneshot_grid).
    Now it is resampled to the LDCT's pixel size and centred, said in the log and recorded."""
    wide = np.full((5, 96, 96), -1000.0, np.float32)
    wide[:, 16:80, 16:80] = noisy(phantom(5, 64, seed=3), 10, 1)
    path = write_volume(Volume(wide, (0.6, 0.6, 2.0)), tmp_path / "wide_ndct.nrrd")  # the LDCT's: 0.8 mm
    said, recorded = {}, {}
    for key, ndct in (("wide", path), ("same", files["ndct"])):
        rc, out, err = run_cli(capsys, "oneshot", "--model", files["model"], "--ldct", files["ldct"], "--slice", 2,
                               "--ndct-unpaired", ndct, "--name", f"u_{key}", "--iterations", 3, "--patch-size", 64,
                               "--progress", "none")
        assert rc == 0, err
        said[key] = "the unpaired NDCT slice (96x96 pixels of 0.6x0.6 mm) is resampled to the LDCT's pixel size" in err
        recorded[key] = Adaptation.read(out.strip().splitlines()[-1].split(" ", 1)[1]).info.get("ndct_resampled")
    assert said == {"wide": True, "same": False}
    assert recorded["same"] is None
    assert recorded["wide"]["ndct_pixels"] == [96, 96] and recorded["wide"]["ndct_spacing_xy_mm"] == [0.6, 0.6]


def test_on_reference_grid_keeps_places_in_millimetres_about_the_centre():
    """Resampled by each axis's own pixel size ((columns, rows) mm), centred, air beyond the slice."""
    from CoreDiffLib.oneshot import on_reference_grid
    same = np.arange(12.0).reshape(3, 4)
    assert np.array_equal(on_reference_grid(same, (0.7, 0.7), (3, 4), (0.7, 0.7)), same)
    block = np.zeros((40, 80))  # 40 mm x 40 mm: rows 1.0 mm, columns 0.5 mm
    block[8:13, 56:65] = 100.0  # its centre 9.5 mm above and 10.25 mm right of the middle
    out = on_reference_grid(block, (0.5, 1.0), (60, 60), (1.0, 1.0))
    inside = out[10:50, 10:50]
    rows, cols = np.nonzero(inside > 0)
    weights = inside[rows, cols]
    assert np.average(rows, weights=weights) == pytest.approx(10.0, abs=0.3)
    assert np.average(cols, weights=weights) == pytest.approx(29.75, abs=0.3)
    assert inside.sum() == pytest.approx(block.sum() / 2, rel=0.1)  # two source columns to a pixel
    assert (out[:9] == -1000).all() and (out[:, 51:] == -1000).all()  # beyond its 40 mm: air
    wide = on_reference_grid(np.pad(block, ((10, 10), (20, 20))), (0.5, 1.0), (40, 40), (1.0, 1.0))
    assert np.allclose(wide, on_reference_grid(block, (0.5, 1.0), (40, 40), (1.0, 1.0)))  # a wider field: cropped


def test_an_unpaired_slice_at_twice_the_matrix_fits_as_the_same_slice_on_the_grid():
    """The same normal-dose texture given at twice the matrix over the same field fits (nearly) the
    weights it fits at the LDCT's own size once put on the grid; read at its own pixel size its
    noise looks finer and the fit chose other steps."""
    from scipy.ndimage import zoom

    from CoreDiffLib.oneshot import on_reference_grid
    vol = phantom(6, 128, seed=7)
    steps = step_stack(vol[2], seed=3)
    target = noisy(vol, 10, 3)[4]
    fine = zoom(target, 2, order=0)  # each pixel four: the same image at half the pixel size

    def probabilities(slice_hu):
        fit = fit_step_weights(steps, torch.from_numpy(hu_to_unit(slice_hu)), "unpaired", iterations=200,
                               patch_size=64, seed=0)
        return torch.softmax(torch.tensor(fit.logits), 0).numpy()
    same = probabilities(target)
    regridded = probabilities(on_reference_grid(fine, (0.5, 0.5), (128, 128), (1.0, 1.0)))
    cropped = probabilities(fine[64:192, 64:192])  # at its own pixel size, the middle of it
    assert np.abs(regridded - same).max() < 0.1, (same, regridded)
    assert np.abs(cropped - same).max() > 2 * np.abs(regridded - same).max(), (same, regridded, cropped)


def test_the_listing_says_when_a_base_model_is_gone_and_a_saved_name_wins_over_a_file(user_home, tmp_path,
                                                                                        monkeypatch):
    """`corediff models` and the Slicer list warn of an adaptation whose base model is gone or has
    changed; a saved adaptation's name is found before a file of that name in the working folder."""
    from CoreDiffLib.adaptations import default_path, resolve_adaptation
    from CoreDiffLib.manifest import default_model_name, load_manifest
    shipped = load_manifest()["models"][default_model_name()]["sha256"]
    for name, sha in (("gone", "0" * 64), ("kept", shipped)):
        default_path(name).parent.mkdir(parents=True, exist_ok=True)
        Adaptation(name, sha, None, "paired", 0, 0, T, [0.0] * T).save(default_path(name))
    own = tmp_path / "own.safetensors"  # a model of one's own, found by the path the fit recorded ...
    Adaptation("own", save_weights(tiny_model(), own), None, "paired", 0, 0, T, [0.0] * T,
               info={"base_model": str(own)}).save(default_path("own"))
    rows = {row["name"]: row for row in list_adaptations()}
    assert rows["gone"]["base_found"] is False and "base model is missing or has changed" in rows["gone"]["description"]
    assert rows["kept"]["base_found"] is True and "missing" not in rows["kept"]["description"]
    assert rows["own"]["base_found"] is True and adaptation_base_model("own") == str(own)
    save_weights(tiny_model(seed=1), own)  # ... unless another model is at that path now
    rows = {row["name"]: row for row in list_adaptations()}
    assert rows["own"]["base_found"] is False and "has changed since the fit" in rows["own"]["description"]
    assert adaptation_base_model("own") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").write_text("not an adaptation")
    assert resolve_adaptation("kept") == default_path("kept")
    assert resolve_adaptation("kept.json") == default_path("kept")  # by its file's name (was 'does not exist')
    (tmp_path / "kept.json").write_text("{}")
    assert resolve_adaptation("kept.json").resolve() == tmp_path / "kept.json"  # a file given by its path comes first
    with pytest.raises(CoreDiffError, match="adaptation file other.json does not exist"):
        resolve_adaptation("other.json")


def test_adapt_hands_the_fit_the_reference_its_options_and_the_ndct_on_the_ldct_grid(monkeypatch):
    """From a mutation review: adapt() could drop --ssim-weight, --seed or --patch-size on the way
    to the fit, take the guide and fidelity anchor from slice 0, swap the two pixel sizes when
    regridding, or hand the fit the sampler states in reverse order, and every test passed. With
    only the NDCT's pixel size given, the LDCT's was taken as 1 mm (the docstring says: equal)."""
    from CoreDiffLib.diffusion import sample
    from CoreDiffLib.inference import context_stack
    from CoreDiffLib.oneshot import on_reference_grid, reference_step_outputs
    seen = {}
    real = oneshot.fit_step_weights

    def spy(steps, target, mode, **options):
        seen.update(options, steps=steps, target=target)
        return real(steps, target, mode, **dict(options, iterations=1))
    monkeypatch.setattr(oneshot, "fit_step_weights", spy)
    net = tiny_model()
    volume = phantom(4, 64, seed=1)
    ldct = noisy(volume, 60, 1)
    other_grid = noisy(phantom(4, 48, seed=3), 10, 2)  # 48 pixels of 1.25 mm: the LDCT's 60 mm field of view
    adapt(net, ldct, 1, other_grid, mode="unpaired", iterations=3, patch_size=56, seed=7,
          ldct_spacing_xy=(1.0, 1.0), ndct_spacing_xy=(1.25, 1.25))
    assert (seen["iterations"], seen["patch_size"], seen["seed"]) == (3, 56, 7)
    assert torch.equal(seen["guide_unit"], torch.from_numpy(hu_to_unit(ldct[1])))
    assert seen["anchor_unit"] is seen["guide_unit"]
    regridded = on_reference_grid(other_grid[3], (1.25, 1.25), (64, 64), (1.0, 1.0))  # slice 1 + 2
    assert torch.allclose(seen["target"], torch.from_numpy(hu_to_unit(regridded)), atol=1e-6)
    stack = torch.from_numpy(context_stack(ldct, 1, 2))
    assert torch.equal(seen["steps"], reference_step_outputs(net, ldct, 1))
    sampled = sample(net, stack, None, keep_steps=True).steps[:, 0]
    assert torch.allclose(seen["steps"], sampled)  # in the order combine() blends them
    adapt(net, ldct, 1, noisy(volume, 10, 2), mode="paired", iterations=1, ssim_weight=0.5)
    assert seen["ssim_weight"] == 0.5
    same = adapt(net, ldct, 1, noisy(volume, 10, 2), mode="unpaired", iterations=1, ndct_spacing_xy=(0.8, 0.8))
    assert "ndct_resampled" not in same.info


def test_the_ssim_term_rewards_likeness_and_a_same_pixel_size_slice_of_another_matrix_is_centred():
    """Mutation survivors: the SSIM term with its sign flipped (the fit then maximised
    dissimilarity), and a slice of the LDCT's pixel size but another matrix returned as it was
    (the fit then failed on slices of two sizes)."""
    from CoreDiffLib.oneshot import on_reference_grid, paired_loss
    target = torch.from_numpy(hu_to_unit(phantom(1, 64, seed=2)[0]))[None, None]
    noisy_output = target + 0.01 * torch.randn_like(target)
    assert float(paired_loss(target, target, ssim_weight=0.5)) == pytest.approx(0.0, abs=1e-6)
    mse = float(paired_loss(noisy_output, target))
    assert float(paired_loss(noisy_output, target, ssim_weight=0.5)) > mse + 0.01
    small = phantom(1, 48, seed=3)[0]
    placed = on_reference_grid(small, (0.8, 0.8), (64, 64), (0.8, 0.8))
    np.testing.assert_allclose(placed[8:56, 8:56], small, atol=1e-3)
    assert placed.shape == (64, 64) and (placed[:8] == -1000.0).all() and (placed[:, 56:] == -1000.0).all()


def test_fit_patches_are_drawn_where_the_reference_is_soft_tissue():
    """The unpaired loss compares soft-tissue texture: its patches come from where the LDCT is
    soft tissue, then body, then anywhere. Widening the soft-tissue range to all HU, accepting any
    corner, or never preferring soft tissue all passed every test."""
    from CoreDiffLib.oneshot import _patch_corners
    guide = np.full((128, 128), -1000.0, np.float32)
    guide[:, :64] = 1000.0  # bone on the left, soft tissue on the right
    guide[:, 64:] = 40.0
    corners = _patch_corners(guide, 32)
    assert len(corners) >= 16 and corners[:, 1].min() >= 64 - 16 and corners[:, 1].max() == 128 - 32
    guide[:, 64:] = 1000.0  # no soft tissue: the body (above -500 HU), here everywhere
    assert len(_patch_corners(guide, 32)) == (128 - 32 + 1) ** 2
    guide[:] = -1000.0  # air only: anywhere
    assert len(_patch_corners(guide, 32)) == (128 - 32 + 1) ** 2


def test_the_unpaired_fit_minimises_the_texture_loss_written_out_patch_by_patch():
    """The fit computes the unpaired loss in closed form (band energies as quadratic forms in the
    weights, over a pool of patches). Written out here the plain way, on the blend itself: per
    patch and scale, the log band energies of the blend inside the *guide's* soft-tissue mask
    against those of the normal-dose slice inside *its own* mask, a pair counting only where both
    masks hold 32 pixels or more; plus the fidelity, the blend's Gaussian low-pass (sigma 4 px)
    against the anchor's, in units of 10 HU. Which mask, the both-masks rule and the low-pass
    scale each survived every other test."""
    vol = phantom(6, 128, seed=9)
    steps = step_stack(vol[2], seed=6)[:, 0]
    guide = torch.from_numpy(hu_to_unit(noisy(vol[2:3], 60, 7)[0]))
    target = torch.from_numpy(hu_to_unit(np.roll(noisy(vol, 10, 8)[3], (9, -7), (0, 1))))  # another slice, moved
    p, seed, batch = 64, 3, 8
    fit = fit_step_weights(steps, target, "unpaired", iterations=1, patch_size=p, seed=seed, batch_size=batch,
                           guide_unit=guide, anchor_unit=guide, fidelity_weight=0.5)

    pool = oneshot._pool(oneshot._patch_corners(oneshot._hu(guide).numpy(), p), 256, seed)
    corners = pool[np.random.default_rng(seed + 7919).integers(len(pool), size=max(32, batch))]
    blend = steps.mean(0)  # the uniform weights the fit starts from
    responses = oneshot.filter_responses(blend[None, None])
    target_responses = oneshot.filter_responses(target[None, None])
    guide_masks = oneshot.soft_tissue_masks(guide[None, None])
    target_masks = oneshot.soft_tissue_masks(target[None, None])
    squares, terms, one_mask_only = 0.0, 0, 0
    for y, x in corners:
        for level in range(oneshot.LEVELS):
            q, ys, xs = (p >> level) - 2 * oneshot._RADIUS, y >> level, x >> level
            window = (slice(ys, ys + q), slice(xs, xs + q))
            mo, mt = guide_masks[level][0, 0][window].double(), target_masks[level][0, 0][window].double()
            ro = responses[level][0][(slice(None), *window)].double()
            rt = target_responses[level][0][(slice(None), *window)].double()
            if (mo.sum() >= 32) != (mt.sum() >= 32):
                one_mask_only += 1
            if mo.sum() < 32 or mt.sum() < 32:
                continue
            eo = (ro ** 2 * mo).sum(dim=(1, 2)) / mo.sum()
            et = (rt ** 2 * mt).sum(dim=(1, 2)) / mt.sum()
            squares += float(((torch.log(eo + 1.0) - torch.log(et + 1.0)) ** 2).sum())
            terms += 3
    lowpass = [ndi.gaussian_filter(oneshot._hu(x).double().numpy(), 4.0, mode="nearest", truncate=3.0)
               for x in (blend, guide)]
    fidelity = np.mean([(((lowpass[0] - lowpass[1])[y:y + p, x:x + p] / 10.0) ** 2).mean() for y, x in corners])
    assert terms > 0 and one_mask_only > 0  # the case exercises both rules
    assert fit.loss_uniform == pytest.approx(squares / terms + 0.5 * fidelity, rel=1e-4)


def test_the_command_keeps_an_adaptation_another_run_saved_under_its_name_meanwhile(files, user_home, capsys, tmp_path,
                                                                                     monkeypatch):
    """The name is checked free before the fit; another run may save under it during the fit, and
    its file is kept (without --overwrite), not replaced by this run's."""
    out = tmp_path / "race.json"
    real_adapt = oneshot.adapt

    def adapt_while_another_run_saves(*args, **kwargs):
        adaptation = real_adapt(*args, **kwargs)
        out.write_text("another run's adaptation")
        return adaptation

    monkeypatch.setattr(oneshot, "adapt", adapt_while_another_run_saves)
    command = ("oneshot", "--model", files["model"], "--ldct", files["ldct"], "--slice", 2, "--ndct", files["ndct"],
               "--name", "race", "--out", out, "--iterations", 5, "--progress", "none")
    rc, _, err = run_cli(capsys, *command)
    assert rc == 2 and "was saved by another run meanwhile; kept it" in err
    assert out.read_text() == "another run's adaptation" and sorted(p.name for p in tmp_path.iterdir()) == ["race.json"]
    rc, _, err = run_cli(capsys, *command, "--overwrite")
    assert rc == 0, err
    assert Adaptation.read(out).reference_slice == 2
