"""Speed paths must compute the same thing; memory must not grow with the number of slices.

No timing assertions: speed figures come from ``corediff bench`` (printed). What is asserted:
every execution back-end reproduces eager fp32 on the exact sampler, the benchmark reports
its rows/notes/accuracy verdicts, inapplicable combinations are skipped with a reason, the
file-to-file path streams (peak RSS for 1,000 slices ~ peak RSS for 100 slices), streamed
outputs equal the in-memory result with the input's geometry, and a CUDA out-of-memory
halves the batch with a message instead of failing.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import synthetic_ct, write_image

from CoreDiffLib import CoreDiffError
from CoreDiffLib.diffusion import sample
from CoreDiffLib.inference import Denoiser, context_stack, denoise_file, denoise_volume
from CoreDiffLib.io import read_volume
from CoreDiffLib.models import save_weights
from CoreDiffLib.network import ClearNet, NetworkConfig
from CoreDiffLib.runtime import RunSettings, auto_settings, build_net, check_applicable
from CoreDiffLib.streaming import VolumeSource

REPO = Path(__file__).resolve().parents[1]


def tiny_net(width: int = 8, seed: int = 0) -> ClearNet:
    torch.manual_seed(seed)
    net = ClearNet(NetworkConfig(width=width, steps=4)).eval()
    with torch.no_grad():  # the output conv starts at zero (identity): give it a small random map
        torch.nn.init.normal_(net.out.weight, std=0.05)
    return net


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(tiny_net(4), path)
    return path


# ----------------------------------------------------------------------------- back-ends
@pytest.mark.parametrize("settings", [RunSettings("fp32", True, "eager"), RunSettings("fp32", False, "onnx")],
                         ids=lambda s: s.label())
def test_backends_reproduce_eager_fp32_sampler(settings):
    pytest.importorskip("onnxruntime") if settings.backend == "onnx" else None
    net = tiny_net()
    stack = torch.from_numpy(context_stack(synthetic_ct(4, 40), 0, 4))
    ref = sample(net, stack).steps
    fast = build_net(tiny_net(), torch.device("cpu"), settings)
    got = sample(fast, stack).steps            # every step, EMM off (first) and on (rest)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < 1e-5


def test_an_explicit_channels_last_on_cpu_runs_eager_channels_last():
    """--channels-last was dropped without a word when ONNX Runtime was the CPU default."""
    pytest.importorskip("onnxruntime")
    assert Denoiser.load(tiny_net(), "cpu").settings.backend == "onnx"
    asked = Denoiser.load(tiny_net(), "cpu", channels_last=True).settings
    assert (asked.backend, asked.channels_last) == ("eager", True)


def test_out_may_not_be_the_input_nor_an_integer_type_too_narrow_for_the_result():
    """An out= of uint16 clipped air to 0 HU without a word; out= the input itself read denoised
    slices back as the next batch's context (7-8 HU off at each batch's first slice)."""
    volume = synthetic_ct(4, 32)
    den = Denoiser.load(tiny_net(), "cpu")
    for dtype in (np.uint16, np.int8):
        with pytest.raises(CoreDiffError, match=f"out= is {np.dtype(dtype).name}, which cannot hold the result"):
            denoise_volume(volume, denoiser=den, out=np.zeros(volume.shape, dtype))
    with pytest.raises(CoreDiffError, match="out= is .*the input array"):
        denoise_volume(volume, denoiser=den, out=volume)
    whole = denoise_volume(volume, denoiser=den, batch_size=2)
    narrow = denoise_volume(volume, denoiser=den, batch_size=2, out=np.zeros(volume.shape, np.int16))
    np.testing.assert_array_equal(narrow, np.clip(np.rint(whole), -32768, 32767))


def test_an_onnx_runtime_that_disagrees_with_pytorch_falls_back_to_eager_with_a_warning(monkeypatch):
    """It aborted every CPU denoise, advising a --runtime flag that does not exist."""
    pytest.importorskip("onnxruntime")
    from CoreDiffLib import runtime
    real_call = runtime.OnnxNet.__call__
    monkeypatch.setattr(runtime.OnnxNet, "__call__", lambda self, *a: real_call(self, *a) + 1e-3)
    with pytest.warns(UserWarning, match="onnx/fp32 unavailable .*differs from PyTorch's.*using eager"):
        den = Denoiser.load(tiny_net(), "cpu", precision="fp32", runtime="onnx")
    assert den.settings.backend == "eager"


def test_onnx_exports_are_told_apart_by_their_weights_and_a_nan_export_falls_back_to_eager(tmp_path, monkeypatch):
    """From a mutation review: exports named by the configuration alone (two models' weights
    sharing one export and its kept output, the check passing), an export giving NaN taken as a
    match (NaN compares False), and ONNX Runtime asked for bf16 (it runs fp32; the header would
    say bf16) each passed every test."""
    pytest.importorskip("onnxruntime")
    from CoreDiffLib import runtime
    from CoreDiffLib.runtime import OnnxNet, export_onnx
    a, b = tiny_net(seed=0), tiny_net(seed=1)
    paths_a, paths_b = export_onnx(a, tmp_path), export_onnx(b, tmp_path)
    assert set(paths_a.values()).isdisjoint(paths_b.values())
    x, t = torch.rand(1, 3, 32, 32), torch.tensor([2])
    with torch.no_grad():
        for net, paths in ((a, paths_a), (b, paths_b)):
            assert torch.allclose(OnnxNet(net, paths=paths)(x, t), net(x, t), atol=1e-4)
    monkeypatch.setattr(runtime.OnnxNet, "__call__", lambda self, *args: torch.full((1, 1, 32, 32), float("nan")))
    with pytest.warns(UserWarning, match="onnx/fp32 unavailable .*differs from PyTorch's.*using eager"):
        den = Denoiser.load(a, "cpu", precision="fp32", runtime="onnx")
    assert den.settings.backend == "eager"
    assert "fp32 only" in check_applicable(RunSettings("bf16", False, "onnx"), torch.device("cpu"))


def test_a_damaged_cached_onnx_export_is_made_again(tmp_path):
    """A truncated cache file sent every later run to eager PyTorch (4x slower), for good."""
    pytest.importorskip("onnxruntime")
    from CoreDiffLib.runtime import export_onnx
    net = tiny_net()
    paths = export_onnx(net, tmp_path)
    damaged = paths[True]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    again = export_onnx(net, tmp_path)
    assert again == paths and again[True].stat().st_size > 1000
    den = Denoiser.load(net, "cpu", precision="fp32", runtime="onnx")
    assert den.settings.backend == "onnx"


def test_a_cached_onnx_export_is_checked_without_running_pytorchs_network(tmp_path, monkeypatch):
    """Every CPU run checked its cached ONNX export against PyTorch's forward pass, whose first
    call alone cost 0.7 s on 2 cores, in a run that otherwise never runs PyTorch's network."""
    pytest.importorskip("onnxruntime")
    from CoreDiffLib.network import ClearNet
    from CoreDiffLib.runtime import export_onnx
    net = tiny_net()
    paths = export_onnx(net, tmp_path)
    kept = sorted(p.name for p in tmp_path.glob("*.expected.npy"))
    assert kept == sorted(p.name.replace(".onnx", ".expected.npy") for p in paths.values())

    def no_pytorch(*args, **kwargs):
        raise AssertionError("PyTorch's network ran")
    monkeypatch.setattr(ClearNet, "forward", no_pytorch)
    assert export_onnx(net, tmp_path) == paths
    monkeypatch.undo()
    # a kept output that no longer matches (damaged, or the export is): exported and computed again
    np.save(tmp_path / kept[0], np.zeros((1, 1, 32, 32), np.float32))
    assert export_onnx(net, tmp_path) == paths
    den = Denoiser.load(net, "cpu", precision="fp32", runtime="onnx")
    assert den.settings.backend == "onnx"


def test_the_onnx_cache_keeps_the_exports_of_the_models_used_last(tmp_path, monkeypatch):
    """A script denoising with each new state of a network in training exported a new pair of
    files (~9 MB at width 32) every time, and the cache was never pruned."""
    pytest.importorskip("onnxruntime")
    from CoreDiffLib.runtime import ONNX_CACHE_MODELS, export_onnx, onnx_cache_dir
    monkeypatch.setenv("COREDIFF_CACHE", str(tmp_path / "cache"))
    cache, mine = onnx_cache_dir(), tmp_path / "mine"
    for folder in (cache, mine):
        folder.mkdir(parents=True)
        for k in range(ONNX_CACHE_MODELS + 4):  # model k last used at time 1000 + k
            for kind in ("plain", "emm"):
                path = folder / f"clearnet-{k:016x}-{kind}.onnx"
                path.write_bytes(b"an export")
                os.utime(path, (1000 + k, 1000 + k))
                path.with_name(path.name.replace(".onnx", ".expected.npy")).write_bytes(b"its output")
    os.utime(cache / f"clearnet-{0:016x}-emm.onnx", (5000, 5000))  # the oldest model, used again since
    net = tiny_net()
    paths = export_onnx(net)
    key = paths[True].name.split("-")[1]
    kept = {p.name.split("-")[1] for p in cache.glob("*.onnx")}
    assert kept == {key, f"{0:016x}"} | {f"{k:016x}" for k in range(6, ONNX_CACHE_MODELS + 4)}
    assert len(list(cache.glob("*.onnx"))) == 2 * ONNX_CACHE_MODELS  # a model's two files go together
    assert {p.name.split("-")[1] for p in cache.glob("*.expected.npy")} == kept  # and their expected outputs
    for path in paths.values():
        os.utime(path, (2000, 2000))
    assert export_onnx(net) == paths and all(p.stat().st_mtime > 2000 for p in paths.values())  # used: renewed
    export_onnx(net, mine)
    assert len(list(mine.glob("*.onnx"))) == 2 * (ONNX_CACHE_MODELS + 4) + 2  # the caller's folder: all kept


def test_inapplicable_combinations_are_explained():
    cpu = torch.device("cpu")
    assert "CUDA" in check_applicable(RunSettings("tf32", False, "eager"), cpu)
    assert "CUDA graphs" in check_applicable(RunSettings("fp32", False, "cudagraphs"), cpu)
    assert "fp16" in check_applicable(RunSettings("fp16", False, "eager"), cpu)
    assert check_applicable(RunSettings("bf16", True, "eager"), cpu) is None
    with pytest.raises(CoreDiffError, match="fp16"):
        Denoiser.load(tiny_net(), "cpu", precision="fp16")


def test_device_defaults_and_overrides(monkeypatch):
    cpu = auto_settings(torch.device("cpu"), 64)                # measured winner on CPU: ONNX Runtime
    assert (cpu.precision, cpu.backend) == ("fp32", "onnx")
    wide = auto_settings(torch.device("cpu"), 128)              # unmeasured widths: eager channels-last
    assert (wide.precision, wide.channels_last, wide.backend) == ("fp32", True, "eager")
    monkeypatch.setenv("COREDIFF_RUNTIME", "eager")
    assert auto_settings(torch.device("cpu"), 16) == RunSettings("fp32", True, "eager")
    cuda = auto_settings(torch.device("cuda"), 64)
    assert cuda.precision == "fp16" and cuda.channels_last      # measured on an H200: 0.000 dB drift
    monkeypatch.setenv("COREDIFF_PRECISION", "bf16")
    assert auto_settings(torch.device("cuda"), 64).precision == "bf16"
    den = Denoiser.load(tiny_net(), "cpu", precision="fp32", channels_last=False, runtime="eager")
    assert den.settings == RunSettings("fp32", False, "eager")
    assert den.threads >= 1 and torch.get_num_threads() == den.threads
    monkeypatch.setenv("COREDIFF_RUNTIME", "compile")
    assert auto_settings(torch.device("cpu"), 16).backend == "compile"
    assert "layout" in check_applicable(RunSettings("fp32", True, "onnx"), torch.device("cpu"))


def test_each_precision_runs_in_its_own_dtype_and_onnx_runtime_uses_the_threads_given():
    """From a mutation review: bf16 and fp16 autocast swapped, or ONNX Runtime pinned to one thread
    (the default CPU runtime: every CPU denoise single-threaded), passed every test."""
    from CoreDiffLib.runtime import OnnxNet, precision_context
    conv = torch.nn.Conv2d(1, 2, 3)
    with precision_context("bf16", torch.device("cpu")):
        assert conv(torch.randn(1, 1, 8, 8)).dtype == torch.bfloat16
    with precision_context("fp32", torch.device("cpu")):
        assert conv(torch.randn(1, 1, 8, 8)).dtype == torch.float32
    pytest.importorskip("onnxruntime")
    for threads in (1, 2):
        sessions = OnnxNet(tiny_net(), threads=threads)._sessions.values()
        assert {s.get_session_options().intra_op_num_threads for s in sessions} == {threads}


def test_automatic_steps_are_all_of_them_on_a_gpu_one_on_a_cpu_and_all_with_an_adaptation():
    from CoreDiffLib.inference import auto_steps
    from CoreDiffLib.adaptations import Adaptation
    T = 10
    assert auto_steps(T, torch.device("cpu")) == 1
    assert auto_steps(T, torch.device("cuda")) == T and auto_steps(T, torch.device("mps")) == T
    assert auto_steps(T, torch.device("cpu"), adaptation=True) == T
    net = tiny_net()
    T = net.config.steps
    assert Denoiser.load(net, "cpu", steps="auto", runtime="eager").steps == 1
    assert Denoiser.load(net, "cpu", steps=None, runtime="eager").steps is None  # the library's default: T
    adaptation = Adaptation("a", "sha", None, "paired", 0, 0, T, [0.0] * T)
    assert Denoiser.load(net, "cpu", steps="auto", adaptation=adaptation, runtime="eager").steps == T
    with pytest.raises(CoreDiffError, match=f"'auto' or between 1 and {T}"):
        Denoiser.load(net, "cpu", steps="fast")


def test_the_callers_network_is_left_as_it_was_and_counts_must_be_whole_numbers(tmp_path):
    """Denoiser.load switched the caller's training network to eval mode in place (and would
    have moved it to the GPU); 2.0 slices per batch and 1.5 steps got past the checks and then
    failed in slicing and in torch.linspace; True was taken for one step."""
    from CoreDiffLib.models import load_model
    from CoreDiffLib.runtime import export_onnx
    net = tiny_net().train()
    first = next(net.parameters())
    den = Denoiser.load(net, "cpu", runtime="eager")
    assert net.training and not den.model.training and den.model is not net
    assert next(net.parameters()) is first
    volume = synthetic_ct(3, 32)
    np.testing.assert_array_equal(denoise_volume(volume, model=net, device="cpu", steps=1),
                                  denoise_volume(volume, denoiser=Denoiser.load(net, "cpu", steps=1)))
    assert net.training
    for steps in (1.5, True, 2.0):
        with pytest.raises(CoreDiffError, match="'auto' or between 1 and"):
            Denoiser.load(net, "cpu", steps=steps)
    for batch in (2.0, True, 0):
        with pytest.raises(CoreDiffError, match="whole number of slices >= 1"):
            denoise_volume(volume, model=net, device="cpu", steps=1, batch_size=batch)
    auto = next(load_model("corediff-25", device="auto").parameters()).device.type
    assert auto == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CoreDiffError, match=r"'auto' is chosen per scan: dose_estimate.choose_model"):
        denoise_volume(volume, model="auto", device="cpu")  # the CLI's default is no model name here
    pytest.importorskip("onnxruntime")  # the export works on a copy too: contiguous, in eval mode
    net.to(memory_format=torch.channels_last)
    export_onnx(net, tmp_path)
    kernels = [p for p in net.parameters() if p.dim() == 4 and p.shape[-1] == 3]
    assert kernels and all(k.is_contiguous(memory_format=torch.channels_last) for k in kernels)


def test_bf16_autocast_is_really_used_and_bounded():
    vol = synthetic_ct(3, 48)
    ref = denoise_volume(vol, tiny_net(), "cpu", precision="fp32")
    bf = denoise_volume(vol, tiny_net(), "cpu", precision="bf16")
    diff = float(np.abs(bf - ref).mean())
    assert 0.0 < diff < 0.01 * 4096             # bf16 changes numbers, within 1% of the HU range
    # whether that drift is acceptable is judged by `corediff bench` (<= 0.05 dB PSNR)


# ----------------------------------------------------------------------------- benchmark
def test_bench_cli_reports_rows_accuracy_and_skips(tmp_path, weights):
    from CoreDiffLib.cli import main
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    rc = main(["bench", "--model", str(weights), "--width", "4", "--size", "32", "--batch-sizes", "1,2",
               "--precisions", "fp32,fp16,tf32", "--channels-last", "--compile", "eager,onnx,cudagraphs",
               "--repeats", "1", "--steps", "2", "--json", str(out), "--markdown", str(md)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    models = {r["model"] for r in rows}
    assert len(models) == 2                       # a weights file and an untrained width, one table
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        base = [r for r in mine if r["baseline"]]
        assert len(base) == 1 and base[0]["variant"] == "eager/fp32" and base[0]["batch"] == 1
        assert base[0]["speedup"] == pytest.approx(1.0)
        for r in mine:
            assert r["s_per_slice"] > 0 and r["slices_per_s"] > 0 and "peak_mb" in r
            assert r["s_per_slice_at_T"] == pytest.approx(r["s_per_slice"] * r["T"] / 2)
            assert "psnr" in r and np.isfinite(r["psnr"])
            if r["variant"].split("/")[1] == "fp32":     # fp32 layouts/back-ends: same numbers
                assert r["mean_abs_diff_hu"] < 1e-2 and r["allowed"]
            assert r["allowed"] == (abs(r["psnr_drift_db"]) <= 0.05)
        assert {r["batch"] for r in mine} == {1, 2}
        assert any(r["variant"] == "onnx/fp32" for r in mine)
    notes = " ".join(s["note"] for s in result["skipped"])
    assert "TF32" in notes and "CUDA graphs" in notes and "fp16" in notes
    assert "| model |" in md.read_text() and "baseline" in md.read_text()
    import re
    table = [line for line in md.read_text().splitlines() if line.startswith("|")]
    cells = {len(re.split(r"(?<!\\)\|", line)) for line in table}  # cells split by unescaped '|'
    assert len(cells) == 1, "a Markdown table needs as many cells in its header, delimiter and rows"


@pytest.mark.parametrize("flag, value", [("--batch-sizes", "0"), ("--batch-sizes", "1,x"), ("--batch-sizes", ""),
                                         ("--threads", "0"), ("--repeats", "0"), ("--slices", "-1"),
                                         ("--steps", "20"),  # above the model's T = 10
                                         ("--precisions", "fp32,fp99"), ("--compile", "eager,foo"),
                                         ("--model", "no-such-model"),  # before the input is simulated
                                         ("--markdown", "table.json"), ("--markdown", "nowhere/table.md")])
def test_bench_refuses_counts_below_one_and_unwritable_outputs_before_running(tmp_path, capsys, flag, value):
    from CoreDiffLib.cli import main
    out = tmp_path / "bench.json"
    if flag == "--markdown":
        value = str(tmp_path / value)
    assert main(["bench", "--width", "4", "--size", "32", flag, value, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert (value if flag == "--model" else flag) in err and "simulated" not in err and not out.exists()


def test_an_untrained_bench_network_changes_its_input_so_precision_drift_can_show():
    """ClearNet's output layer starts at zero (the identity), which no precision can change: the
    bench's untrained network used to score every variant "ok" with 0 HU of difference."""
    from CoreDiffLib.benchmark import _load_model
    from CoreDiffLib.diffusion import sample
    from CoreDiffLib.intensity import hu_to_unit, unit_to_hu
    name, net = _load_model("w8", 10)
    x = torch.from_numpy(hu_to_unit(synthetic_ct(3, 48, seed=1)))[None]
    with torch.no_grad():
        change = np.abs(unit_to_hu(sample(net, x, 1, keep_steps=False).final[0, 0].numpy())
                        - unit_to_hu(x[0, 1].numpy())).mean()
    assert name == "w8 untrained" and 1 < change < 20  # a residual of a trained network's size, in HU


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("ext,compress", [(".nrrd", True), (".nrrd", False), (".mha", True), (".mha", False),
                                          (".nii.gz", True), (".nii", False)])
def test_streamed_file_equals_in_memory_result(tmp_path, weights, ext, compress):
    vol = np.ascontiguousarray(synthetic_ct(7, 40, seed=3)[:, :, 4:36])  # 40 rows, 32 columns: not square
    vol[:, :2] = -3024                               # outside-FOV padding is kept as is
    src = tmp_path / f"in{ext}"
    img = sitk.GetImageFromArray(vol.astype(np.int16))
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-10.0, 20.0, 30.0))
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(src), compress)
    with VolumeSource.open(src) as s:
        assert s is not None and s.shape == vol.shape
        assert np.array_equal(s[2:5], vol[2:5].astype(np.int16))
    den = Denoiser.load(str(weights), "cpu")
    out = tmp_path / f"out{ext}"
    temp = tmp_path / "temp"
    temp.mkdir()
    path, shape, streamed = denoise_file(src, out, den, batch_size=3, temp_dir=temp)
    assert streamed and shape == vol.shape
    assert list(temp.iterdir()) == []  # a compressed input's unpacked copy is gone
    assert path.read_bytes()[:2] == b"\x1f\x8b" if ext == ".nii.gz" else True  # compressed, as named
    assert b"encoding: gzip" in path.read_bytes()[:1000] if ext == ".nrrd" else True
    got, ref_in = read_volume(path), read_volume(src)
    want = denoise_volume(ref_in.array, denoiser=den, batch_size=2, direction=ref_in.direction)  # rows run -y
    assert np.abs(got.array - np.rint(want)).max() <= 1.0   # int16 output, rounding
    assert np.all(got.array[:, :2] == -3024)
    assert got.pixel_type == "int16"
    assert got.spacing == pytest.approx(ref_in.spacing) and got.origin == pytest.approx(ref_in.origin)
    assert got.direction == pytest.approx(ref_in.direction)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, out.name, "temp"])  # no temp left


def test_cancel_leaves_no_output(tmp_path, weights):
    from CoreDiffLib.inference import Cancelled
    src = write_image(tmp_path / "in.mha", synthetic_ct(6, 32))
    calls = []
    with pytest.raises(Cancelled):
        denoise_file(src, tmp_path / "out.nrrd", Denoiser.load(str(weights), "cpu"), batch_size=2,
                     progress=lambda d, n: calls.append(d), cancel=lambda: len(calls) > 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mha"]


def test_ctrl_c_or_sigterm_mid_run_leaves_only_the_input(tmp_path, weights):
    """The collected result is a volume-sized hidden .raw beside the output: a Ctrl-C
    (KeyboardInterrupt, not an Exception) or a SIGTERM must take it away too."""
    import signal
    src = write_image(tmp_path / "in.nrrd", synthetic_ct(6, 32))

    def interrupt(done, total):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        denoise_file(src, tmp_path / "out.nrrd", Denoiser.load(str(weights), "cpu"), batch_size=2, progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nrrd"]
    big = write_image(tmp_path / "big.nrrd", synthetic_ct(60, 64))
    (tmp_path / "in.nrrd").unlink()
    proc = subprocess.Popen([sys.executable, "-m", "CoreDiffLib.cli", "denoise", str(big), str(tmp_path / "o.nrrd"),
                             "--model", str(weights), "--device", "cpu", "--batch-size", "1", "--steps", "4",
                             "--progress", "lines"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    for line in proc.stdout:
        if line.startswith("PROGRESS 1 "):
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.nrrd"]


def test_a_streamed_output_that_fails_while_written_keeps_the_earlier_file(tmp_path, monkeypatch):
    """.nrrd/.mha/.nii(.gz) outputs are written slab by slab from the collected result: a full disk
    halfway must leave the file that was there (the writer goes through a temporary name)."""
    import errno
    import gzip

    from CoreDiffLib.streaming import StreamedOutput
    out = tmp_path / "out.nrrd"
    out.write_bytes(b"an earlier result")
    sink = StreamedOutput(out, (3, 16, 16), {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                                             "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}, np.int16)
    sink.array[:] = np.full((3, 16, 16), 5, np.int16)

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gzip.GzipFile, "write", disk_full)
    with pytest.raises(OSError):
        sink.commit()
    assert out.read_bytes() == b"an earlier result" and [p.name for p in tmp_path.iterdir()] == ["out.nrrd"]


def test_an_interrupted_unpacking_of_a_gzip_nrrd_leaves_no_temporary_file(tmp_path, monkeypatch):
    import zlib

    src = tmp_path / "in.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(synthetic_ct(3, 32).astype(np.int16)), str(src), True)
    temp = tmp_path / "temp"
    temp.mkdir()

    class Interrupted:
        def decompress(self, data):
            raise KeyboardInterrupt
    monkeypatch.setattr(zlib, "decompressobj", lambda *a: Interrupted())
    with pytest.raises(KeyboardInterrupt):
        VolumeSource.open(src, temp_dir=temp)
    assert list(temp.iterdir()) == []


_PEAK_SCRIPT = r"""
import resource, sys
from CoreDiffLib.cli import main
rc = main(["denoise", sys.argv[1], sys.argv[2], "--model", sys.argv[3], "--device", "cpu", "--steps", "1",
           "--batch-size", "4", "--progress", "none"])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def _write_big(path: Path, n: int, size: int) -> None:
    """An int16 CT-like volume written slab-wise through a memmap-backed raw NRRD."""
    base = synthetic_ct(4, size, seed=1).astype(np.int16)
    header = (f"NRRD0004\ntype: short\ndimension: 3\nsizes: {size} {size} {n}\nendian: little\n"
              "encoding: raw\nspace: left-posterior-superior\nspace directions: (0.8,0,0) (0,0.8,0) (0,0,1)\n"
              "space origin: (0,0,0)\n\n").encode()
    with open(path, "wb") as f:
        f.write(header)
        for k in range(n):
            f.write(base[k % 4].tobytes())


def test_a_long_series_is_streamed_slab_by_slab(tmp_path, weights):
    """The whole volume is never held: the run reads and writes slabs (its log says 'streamed').
    The peak RSS of 100 and 1,000 slices is printed, a figure, not asserted (memory goes in
    benchmarks: whole-process RSS depends on the allocator and ONNX Runtime's pools)."""
    size = 160
    peaks = {}
    for n in (100, 1000):
        src = tmp_path / f"vol{n}.nrrd"
        _write_big(src, n, size)
        out = tmp_path / f"den{n}.mha"
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(src), str(out), str(weights)],
                              env=env, capture_output=True, encoding="utf-8", timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{n} slices of {size}x{size}" in proc.stderr and ", streamed" in proc.stderr, proc.stderr[-2000:]
        peaks[n] = int(proc.stdout.split("PEAK_KB")[1].split()[0]) / 1024
        with VolumeSource.open(out) as s:
            assert s.shape == (n, size, size) and s.dtype == np.int16
            first, last = np.asarray(s[1:2]), np.asarray(s[n - 3:n - 2])  # same slices + neighbours
            assert np.array_equal(first, last) and first.std() > 10
    volume_mb = 1000 * size * size * 4 / 2**20        # the 1,000-slice volume as float32
    print(f"\npeak RSS of `corediff denoise`: 100 slices {peaks[100]:.0f} MB, 1000 slices "
          f"{peaks[1000]:.0f} MB (1,000 slices of {size}x{size} = {volume_mb:.0f} MB as float32)")


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".nii.gz"])
def test_dicom_read_as_int32_is_written_as_int16_by_the_streamed_writer_too(tmp_path, weights, ext):
    """ITK widens int16 DICOM with its rescale intercept to int32; only write_volume narrowed it,
    and the .nrrd, .mha and .nii.gz outputs (written by StreamedOutput) doubled in size."""
    from conftest import write_dicom_series
    folder = write_dicom_series(tmp_path / "dicom", synthetic_ct(3, 32), "1.2.3.77")
    assert read_volume(folder).pixel_type == "int32"
    path, _, _ = denoise_file(folder, tmp_path / f"out{ext}", Denoiser.load(str(weights), "cpu", runtime="eager"))
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkInt16


@pytest.mark.parametrize("stored", ["ras", "swapped"])
def test_one_scan_gives_the_same_hu_however_its_file_stores_the_axial_plane(tmp_path, weights, stored):
    """CLEAR-Net is not exactly flip-equivariant: a RAS-stored NIfTI of a scan came out up to 17 HU
    away from its LPS NRRD. Planes are now denoised in the LPS layout the models learned from."""
    image = sitk.GetImageFromArray(synthetic_ct(4, 40, seed=2).astype(np.int16))
    image.SetSpacing((0.7, 0.8, 2.5))
    other = sitk.Flip(image, [True, True, False]) if stored == "ras" else sitk.PermuteAxes(image, [1, 0, 2])
    sitk.WriteImage(image, str(tmp_path / "lps.nrrd"))
    sitk.WriteImage(other, str(tmp_path / "other.nii.gz"))
    den = Denoiser.load(str(weights), "cpu", runtime="eager")
    denoise_file(tmp_path / "lps.nrrd", tmp_path / "a.nrrd", den)
    denoise_file(tmp_path / "other.nii.gz", tmp_path / "b.nrrd", den)
    back = sitk.ReadImage(str(tmp_path / "b.nrrd"))
    back = sitk.Flip(back, [True, True, False]) if stored == "ras" else sitk.PermuteAxes(back, [1, 0, 2])
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.nrrd")))
    assert np.abs(sitk.GetArrayFromImage(back).astype(float) - a).max() < 0.5  # both written as int16 HU
    assert a.std() > 0 and not np.array_equal(a, sitk.GetArrayFromImage(image))  # it denoised something
    direct = denoise_volume(sitk.GetArrayFromImage(other), denoiser=den, direction=other.GetDirection())
    assert np.abs(np.round(direct) - sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b.nrrd")))).max() < 1


# ----------------------------------------------------------------------------- OOM
class _FlakyGPU:
    """Behaves like a Denoiser whose GPU (or CPU) holds at most ``limit`` slices per batch."""

    def __init__(self, limit: int, device: str = "cuda",
                 error: BaseException = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        self.limit, self.batches, self.error = limit, [], error
        self.device = torch.device(device)
        self.model = tiny_net()

    def denoise_batch(self, stack):
        if stack.shape[0] > self.limit:
            raise self.error
        self.batches.append(stack.shape[0])
        return stack[:, 1]            # identity "denoiser": input centre slice in [0, 1]


def test_out_of_memory_halves_batch_and_continues():
    vol = synthetic_ct(11, 32)
    fake, messages = _FlakyGPU(limit=2), []
    out = denoise_volume(vol, denoiser=fake, batch_size=8, log=messages.append)
    assert messages == ["out of GPU memory: continuing with batch size 4",
                        "out of GPU memory: continuing with batch size 2"]
    assert fake.batches == [2, 2, 2, 2, 2, 1] and sum(fake.batches) == 11
    assert np.allclose(out, np.clip(vol, -1024, 3072), atol=1e-3)


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory"),
    RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Failed to allocate memory for requested buffer of size 301989888"),
    MemoryError()])
def test_out_of_memory_on_the_cpu_halves_the_batch_too(error):
    """A 1536^2 scan on a laptop crashed with PyTorch's or ONNX Runtime's traceback, where batch 1 fits."""
    vol = synthetic_ct(5, 32)
    fake, messages = _FlakyGPU(limit=1, device="cpu", error=error), []
    out = denoise_volume(vol, denoiser=fake, batch_size=2, log=messages.append)
    assert messages == ["out of memory: continuing with batch size 1"] and fake.batches == [1] * 5
    assert np.allclose(out, np.clip(vol, -1024, 3072), atol=1e-3)
    with pytest.raises(CoreDiffError, match="computer ran out of memory even with one slice per batch"):
        denoise_volume(vol, denoiser=_FlakyGPU(limit=0, device="cpu", error=error), batch_size=2)


def test_out_of_memory_with_one_slice_is_a_clear_error():
    with pytest.raises(CoreDiffError, match="even with one slice"):
        denoise_volume(synthetic_ct(3, 32), denoiser=_FlakyGPU(limit=0), batch_size=2)


def test_a_gpu_index_the_machine_lacks_is_refused_by_name(monkeypatch):
    from CoreDiffLib import CoreDiffError
    from CoreDiffLib.inference import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1") and pick_device("gpu") == torch.device("cuda")
    for bad in ("cuda:2", "cuda:x", "cuda:"):
        with pytest.raises(CoreDiffError, match="this machine's GPUs are cuda:0 to cuda:1"):
            pick_device(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here: runs on a GPU CI)")
def test_on_a_gpu_the_automatic_half_precision_agrees_with_fp32():
    """Every GPU user's default is fp16 autocast with channels-last; the CPU tests never run it."""
    import copy
    net = tiny_net(width=8)
    stack = np.random.default_rng(0).random((2, 3, 64, 64)).astype(np.float32)
    auto = Denoiser.load(copy.deepcopy(net), "cuda", runtime="eager")
    exact = Denoiser.load(copy.deepcopy(net), "cuda", precision="fp32", channels_last=False, runtime="eager")
    assert auto.settings.precision == "fp16" and auto.settings.channels_last
    drift_hu = np.abs(auto.denoise_batch(stack) - exact.denoise_batch(stack)).max() * 4096.0
    assert drift_hu < 8.0, drift_hu


def test_bench_without_a_model_times_the_default_model(tmp_path):
    """It timed an untrained width-64 network: not what denoise runs, and minutes per slice on a CPU."""
    from CoreDiffLib.cli import main
    from CoreDiffLib.models import default_model_name
    out = tmp_path / "b.json"
    assert main(["bench", "--size", "16", "--repeats", "1", "--steps", "1", "--batch-sizes", "1",
                 "--compile", "eager", "--json", str(out)]) == 0
    assert {r["model"] for r in json.loads(out.read_text())["rows"]} == {default_model_name()}


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_bench_stopped_by_sigterm_or_ctrl_c_writes_the_rows_it_measured_marked_incomplete(tmp_path, signame):
    """`timeout 240 corediff bench ...` (the GPU benchmark's stages) lost every row measured
    before the limit: the outputs are written at the end, and SIGTERM ended the run first. Ctrl-C
    still lost them after SIGTERM kept them (and a SIGTERM exited 1, not 143 as the others do)."""
    import signal
    import time
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    env = dict(os.environ, PYTHONPATH=str(REPO), COREDIFF_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "CoreDiffLib.cli", "bench", "--width", "4", "--size", "32",
                             "--batch-sizes", "1,2", "--compile", "eager", "--steps", "1", "--repeats", "100000",
                             "--json", str(out), "--markdown", str(md)],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            # as a terminal's foreground job has Ctrl-C, also when these tests run in
                            # the background (where SIGINT is ignored, and stays so in the bench)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:  # wait for the timed repeats to begin
        if line.startswith("warm-up done"):
            break
    time.sleep(1.0)
    proc.send_signal(getattr(signal, signame))
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, signame), stderr
    result = json.loads(out.read_text())
    assert "timed repeats" in result["meta"]["stopped_early"]
    assert all(r["s_per_slice"] > 0 and "psnr" in r for r in result["rows"])  # every variant timed at least once
    assert "INCOMPLETE" in md.read_text() and "INCOMPLETE" in stdout and f"stopped by {signame}" in stderr


def test_a_bench_stopped_before_it_starts_timing_keeps_nothing_half_made():
    """Stopped during the warm-up: variants not yet run say so, and no speed is invented for them."""
    from CoreDiffLib.benchmark import run_benchmark
    calls = []

    def stop_after_first_pass() -> bool:
        calls.append(1)
        return len(calls) > 1
    result = run_benchmark(["w4"], size=32, device="cpu", batch_sizes=(1, 2), channels_last=(False,),
                           repeats=3, steps=1, log=lambda m: None, should_stop=stop_after_first_pass)
    base, other = result["rows"]
    assert base["baseline"] and "first_pass_s" in base and "s_per_slice" not in base
    assert other["error"] == "not run: the benchmark was stopped" and "s_per_slice" not in other
    assert "0 of 3 timed repeats" in result["meta"]["stopped_early"]


def test_the_benchmark_caches_a_simulated_input_and_never_a_synthetic_stand_in(tmp_path, monkeypatch):
    """Made while the simulator was missing, the synthetic phantom was cached under the same name
    as a simulation, and stood in for it after astra-toolbox had been installed."""
    pytest.importorskip("astra")
    from CoreDiffLib import CoreDiffError, benchmark, simulation
    from CoreDiffLib.simulation import dataset
    monkeypatch.setenv("COREDIFF_CACHE", str(tmp_path))
    simulate_pair = dataset.simulate_pair

    def missing(*args, **kwargs):
        raise CoreDiffError("simulation needs astra-toolbox")

    for module in (simulation, dataset):
        monkeypatch.setattr(module, "simulate_pair", missing)
    notes = []
    _, _, kind = benchmark.bench_input(64, 3, 0, log=notes.append)
    assert kind.startswith("synthetic") and "simulate_pair unavailable" in notes[0]
    assert list(tmp_path.rglob("*bench_input*")) == []
    for module in (simulation, dataset):
        monkeypatch.setattr(module, "simulate_pair", simulate_pair)
    ldct, ndct, kind = benchmark.bench_input(64, 3, 0, log=notes.append)
    assert kind.startswith("simulated") and ldct.shape == ndct.shape == (3, 64, 64)
    cached = [p.name for p in tmp_path.rglob("*bench_input*")]
    assert cached == [f"bench_input_64_3_0_{benchmark._simulator_version()}.npz"]
    for module in (simulation, dataset):
        monkeypatch.setattr(module, "simulate_pair", missing)
    again, _, kind = benchmark.bench_input(64, 3, 0, log=notes.append)  # from the cache
    assert kind.startswith("simulated") and np.array_equal(again, ldct)
    # an input an earlier simulator made (an I0 recalibrated since) is not shown as today's scan
    for module in (simulation, dataset):
        monkeypatch.setattr(module, "simulate_pair", simulate_pair)
    (tmp_path / cached[0]).unlink()
    old = np.zeros_like(ldct)  # cached before inputs were named by their simulator
    np.savez(tmp_path / "bench_input_64_3_0.npz", ldct=old, ndct=old, kind=np.array("simulated 25% dose (abdomen)"))
    other_seed = "bench_input_64_3_10_0123456789.npz"
    np.savez(tmp_path / other_seed, kind=np.array("simulated"))
    fresh, _, kind = benchmark.bench_input(64, 3, 0, log=notes.append)
    assert np.array_equal(fresh, ldct)  # simulated again (the same seed: the same scan), not the old one
    assert sorted(p.name for p in tmp_path.rglob("*bench_input*")) == sorted(cached + [other_seed])
    monkeypatch.setattr(benchmark, "_simulator_version", lambda: "fedcba9876")  # the simulator changed
    calls = []
    monkeypatch.setattr(benchmark, "_make_bench_input", lambda *a: calls.append(a) or (ldct, ldct, "simulated x"))
    benchmark.bench_input(64, 3, 0, log=notes.append)
    assert calls and not (tmp_path / cached[0]).exists()


def test_the_gpu_benchmark_script_rehearses_on_the_cpu_and_returns_few_enough_files(tmp_path):
    """It wrote 13 files (the device machine returns 8) and had never run before a GPU was lent."""
    out = tmp_path / "out"
    stale = out / "compiled.json"
    out.mkdir()
    stale.write_text("{}")  # from an earlier run: must not pass for this run's result
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), PYTHON=sys.executable,
               COREDIFF_CACHE=str(tmp_path / "cache"))
    run = subprocess.run(["bash", str(REPO / "Testing/benchmarks/gpu_benchmark.sh")], env=env,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["compiled.json", "cudagraphs.json", "eager_grid.json", "gpu_benchmark.md", "log.txt"]
    for stage in ("eager_grid", "cudagraphs", "compiled"):
        rows = json.loads((out / f"{stage}.json").read_text())["rows"]
        assert any(r["baseline"] and r["s_per_slice"] > 0 for r in rows)
    report = (out / "gpu_benchmark.md").read_text()
    assert report.count("| model |") == 3 and "# Summary" in report and "fastest allowed" in report
    assert "== compiled" in (out / "log.txt").read_text()
    # the speed-up quoted is the fastest row's over the baseline printed beside it (it was another
    # stage's: 12.0x beside a baseline 5.9 times as slow)
    base_run, base = re.search(r"baseline \(eager fp32, batch 1, measured in (\w+)\): ([\d.]+) s/slice",
                               report).groups()
    best_run, best, ratio = re.search(r"fastest allowed: .*\((\w+)\): ([\d.]+) s/slice \(\d+ slices/s, ([\d.]+)x",
                                      report).groups()
    assert base_run == best_run and float(ratio) == pytest.approx(float(base) / float(best), abs=0.06)


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".nii", ".nii.gz"])
def test_a_streamed_output_written_in_many_chunks_reads_back_voxel_for_voxel(tmp_path, monkeypatch, ext):
    """Real volumes are written 16 MB at a time; the small test volumes fit in one chunk, so here
    a chunk holds 2 slices (whole slices: 2.5 rounds down): 7 slices in chunks of 2, 2, 2 and 1."""
    from CoreDiffLib.streaming import StreamedOutput
    monkeypatch.setattr(StreamedOutput, "WRITE_CHUNK_BYTES", int(2.5 * 12 * 10 * 2))
    volume = np.random.default_rng(3).integers(-1024, 3000, (7, 12, 10)).astype(np.int16)
    info = {"spacing": (0.7, 0.8, 2.5), "origin": (-3.0, 4.0, -50.0), "direction": (0, 1, 0, -1, 0, 0, 0, 0, 1)}
    sink = StreamedOutput(tmp_path / f"out{ext}", volume.shape, info, np.int16)
    sink.array[:] = volume
    written = sink.commit()
    back = sitk.ReadImage(str(written))
    assert np.array_equal(sitk.GetArrayFromImage(back), volume)
    assert back.GetSpacing() == pytest.approx(info["spacing"]) and back.GetOrigin() == pytest.approx(info["origin"])
    assert back.GetDirection() == pytest.approx(info["direction"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{ext}"]


def test_every_figure_a_bench_row_derives_is_what_its_timings_and_outputs_give(monkeypatch):
    """Only that figures were positive was checked: a speed-up upside down, seconds per slice divided
    by the batch, a drift's sign, a 1 dB loss passed as 'ok', the reference one slice off, or the
    accuracy read from one slice all printed wrong with every test passing."""
    import statistics

    from CoreDiffLib import benchmark
    from CoreDiffLib.intensity import unit_to_hu
    from CoreDiffLib.metrics import psnr
    seconds = {("eager/fp32", 1): 4.0, ("eager/fp32", 2): 2.0, ("eager/fp32/CL", 1): 8.0, ("eager/fp32/CL", 2): 1.0}
    offsets = {("eager/fp32", 1): 0.0, ("eager/fp32", 2): 2.0, ("eager/fp32/CL", 1): -30.0, ("eager/fp32/CL", 2): 0.5}
    passes = {}

    def timed(v, stack, device):  # the LDCT back (an identity network), shifted by a variant's offset
        key = (v.label(), v.batch)
        passes[key] = passes.get(key, 0) + 1
        return seconds[key] + 0.1 * passes[key], unit_to_hu(stack[:, 1]) + offsets[key]
    monkeypatch.setattr(benchmark, "_run_pass", timed)
    result = benchmark.run_benchmark(["w4"], size=32, device="cpu", batch_sizes=(1, 2), channels_last=(False, True),
                                     repeats=3, steps=1, log=lambda m: None)
    n = result["meta"]["slices"]
    ldct, ndct, _ = benchmark.bench_input(32, n + 2, 0, log=lambda m: None)
    rows = {(row["variant"], row["batch"]): row for row in result["rows"]}
    base = rows[("eager/fp32", 1)]
    assert base["baseline"] and len(rows) == 4
    for key, row in rows.items():
        times = [seconds[key] + 0.1 * k for k in (2, 3, 4)]  # the three timed passes after the warm-up
        assert row["s_per_slice"] == pytest.approx(statistics.median(times) / n)
        assert row["slices_per_s"] == pytest.approx(1 / row["s_per_slice"])
        assert row["speedup"] == pytest.approx(base["s_per_slice"] / row["s_per_slice"])
        expected = np.mean([psnr(a + offsets[key], b) for a, b in zip(ldct[1:n + 1], ndct[1:n + 1])])
        assert row["psnr"] == pytest.approx(expected, abs=1e-6)  # every slice, against its own reference
        assert row["psnr_drift_db"] == pytest.approx(row["psnr"] - base["psnr"])
        assert row["allowed"] == (abs(row["psnr_drift_db"]) <= benchmark.MAX_DRIFT_DB)
    assert rows[("eager/fp32/CL", 1)]["psnr_drift_db"] < -1 and not rows[("eager/fp32/CL", 1)]["allowed"]
    assert rows[("eager/fp32/CL", 2)]["speedup"] == pytest.approx(4.3 / 1.3)  # medians of the timed passes
    # the "(best)" column: each variant's fastest pass against the baseline's fastest (a review's survivors)
    for key, row in rows.items():
        assert row["best_s_per_slice"] == pytest.approx((seconds[key] + 0.2) / n)
        assert row["speedup_best"] == pytest.approx(base["best_s_per_slice"] / row["best_s_per_slice"])
    assert result["meta"]["ldct_psnr"] == pytest.approx(np.mean([psnr(a, b) for a, b in zip(ldct[1:n + 1],
                                                                                             ndct[1:n + 1])]))
    table = benchmark.format_table(result)
    lines = {" ".join(line.split()[2:4]): line for line in table.splitlines()
             if line.startswith("w4 ")}  # "w4 untrained", variant, batch
    assert "not allowed" in lines["eager/fp32/CL 1"] and lines["eager/fp32/CL 2"].rstrip().endswith(" ok")
    # slices are whole batches of the largest size: 3 slices at batches 1 and 2 time 4, not 2
    passes.clear()
    odd = benchmark.run_benchmark(["w4"], size=32, device="cpu", batch_sizes=(1, 2), repeats=1, steps=1,
                                  slices=3, log=lambda m: None)
    assert odd["meta"]["slices"] == 4


def test_a_bench_pass_samples_the_steps_asked_for_at_each_variants_thread_count(monkeypatch):
    """--steps ignored (every row timing all T steps) or one variant's thread count left for the
    next passed every test: the timed pass was never looked into."""
    from CoreDiffLib import benchmark
    seen = []

    def recording(net, x, steps, **kwargs):
        seen.append((steps, torch.get_num_threads(), x.shape[0]))
        return sample(net, x, steps, **kwargs)
    monkeypatch.setattr(benchmark, "sample", recording)
    threads = torch.get_num_threads()
    try:
        result = benchmark.run_benchmark(["w4"], size=32, device="cpu", batch_sizes=(2,), channels_last=(False,),
                                         threads=(1, 2), repeats=1, steps=3, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    n = result["meta"]["slices"]
    rows = result["rows"]  # the baseline (one slice at a time) and the grid: batches of 2 at 1 and 2 threads
    assert [(row["batch"], row["threads"]) for row in rows[1:]] == [(2, 1), (2, 2)]
    one_pass = [(row["threads"], row["batch"]) for row in rows for _ in range(n // row["batch"])]
    assert {steps for steps, _, _ in seen} == {3}
    assert [(used, batch) for _, used, batch in seen] == one_pass * 2  # the warm-up, then the timed repeat


@pytest.mark.parametrize("flag, grid", [([], (False,)), (["--channels-last"], (False, True)),
                                        (["--channels-last", "only"], (True,))])
def test_bench_channels_last_flag_picks_the_memory_formats_timed(monkeypatch, tmp_path, flag, grid):
    """`--channels-last only` (the GPU script's cudagraphs and compiled runs) timed both formats or
    neither with every test passing: the flag's three readings were never checked."""
    from CoreDiffLib import benchmark
    from CoreDiffLib.cli import main
    asked = {}

    def record(models, **kwargs):
        asked.update(kwargs)
        return {"meta": {"device_name": "cpu", "torch": "", "slices": 1, "size": 16, "repeats": 1, "input": "",
                         "ldct_psnr": 0.0, "load_average_start": None, "load_average_end": None},
                "rows": [{"model": "w4", "variant": "eager/fp32", "baseline": True}], "skipped": []}
    monkeypatch.setattr(benchmark, "run_benchmark", record)
    assert main(["bench", "--width", "4", "--size", "16", *flag]) == 0
    assert asked["channels_last"] == grid


def test_a_second_sigterm_ends_the_bench_at_once_with_143():
    """The first SIGTERM lets the pass in hand finish (and the rows be written); a second is an
    impatient scheduler: the run ends there, with the shell's code for SIGTERM."""
    import signal

    from CoreDiffLib.atomic import StopRequests
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as ended:
        with StopRequests(second_exits=True) as stop:  # as cmd_bench takes them
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested  # the first: asked to stop after this pass, nothing raised
            os.kill(os.getpid(), signal.SIGTERM)
    assert ended.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back


def test_the_bench_command_takes_its_signals_so(monkeypatch):
    """cmd_bench's own stop requests: a second signal must exit with its code (143), not be a
    Ctrl-C's KeyboardInterrupt (130, 'no output was written')."""
    from CoreDiffLib import benchmark
    from CoreDiffLib.atomic import StopRequests
    from CoreDiffLib.cli import main
    made = []

    class Recording(StopRequests):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(benchmark, "StopRequests", Recording)
    assert main(["bench", "--width", "4", "--size", "16", "--repeats", "1", "--steps", "1", "--batch-sizes", "1",
                 "--compile", "eager"]) == 0
    assert made == [{"second_exits": True}]


def test_the_peak_memory_column_is_in_mebibytes():
    """A 256 MiB array made inside the measurement shows as about 256 in 'peak MB' (a unit off by
    1,024 printed kilobytes or gigabytes with every test passing)."""
    from CoreDiffLib.benchmark import PeakRSS
    with PeakRSS() as rss:
        block = np.ones(256 * 2**20 // 8)  # float64, every page touched
    del block
    assert 200 < rss.delta_mb < 600


def test_cpu_threads_default_to_physical_cores_not_hyperthreads(monkeypatch):
    """On an SMT machine the default thread count is the physical cores (two threads on one core
    slow PyTorch's convolutions); a count psutil cannot give falls back to the logical CPUs."""
    import psutil

    from CoreDiffLib.runtime import physical_cores
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8 if logical else 4)
    assert physical_cores() == 4
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8 if logical else None)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert physical_cores() == 6
