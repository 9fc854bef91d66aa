"""CoreDiffLib: CoreDiff low-dose CT denoising as a library, a CLI and a Slicer backend.

CoreDiff (Gao et al., IEEE TMI 2024, arXiv:2304.01814) is a *generalized* diffusion model:
sampling starts warm from the low-dose image itself and walks towards the clean image in a
few steps with a mean-preserving degradation operator. The package keeps one idea per module:

- :mod:`CoreDiffLib.intensity`   HU <-> network range
- :mod:`CoreDiffLib.degradation` the operator D(x0, xT, t) and its schedule
- :mod:`CoreDiffLib.network`     CLEAR-Net (context + time embedding + EMM)
- :mod:`CoreDiffLib.diffusion`   the T-step warm-start sampler
- :mod:`CoreDiffLib.training`    the two-stage loss, EMA, checkpoints
- :mod:`CoreDiffLib.models`      shipped weights, manifests, loading
- :mod:`CoreDiffLib.oneshot`     one-shot adaptation to a new dose from one reference slice
- :mod:`CoreDiffLib.dose_estimate` which dose a scan looks like (noise, patient size): --model auto
- :mod:`CoreDiffLib.inference`   whole-volume (or slab) denoising with progress and cancel
- :mod:`CoreDiffLib.runtime`     how the network runs on each device (precision, ONNX, compile)
- :mod:`CoreDiffLib.streaming`   CT files read and written slab by slab
- :mod:`CoreDiffLib.orientation` which way a volume's axial planes run (sagittal/coronal storage)
- :mod:`CoreDiffLib.io`          volumes (NRRD, NIfTI, MHA, DICOM) via SimpleITK; training pairs
- :mod:`CoreDiffLib.dicom`       DICOM series: finding, checking and writing them
- :mod:`CoreDiffLib.atomic`      outputs written whole or not at all; signals held while they land
- :mod:`CoreDiffLib.metrics`     PSNR / SSIM / RMSE as the paper reports them
- :mod:`CoreDiffLib.figures`     before/after figures with a zoomed region
- :mod:`CoreDiffLib.baselines`   BM3D and RED-CNN, the quality benchmark's comparisons
- :mod:`CoreDiffLib.benchmark`   ``corediff bench``: speed, memory and accuracy of each way to run
- :mod:`CoreDiffLib.simulation`  phantoms and physically simulated low-dose CT
- :mod:`CoreDiffLib.cli`         the ``corediff`` command

Nothing here imports Slicer, Qt or VTK.
"""

__version__ = "0.1.0"


class CoreDiffError(Exception):
    """A user-facing problem (bad input, wrong model...). The message says what to do."""
