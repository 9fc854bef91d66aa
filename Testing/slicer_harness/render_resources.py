"""Render the extension icon and screenshot.

    python Testing/slicer_harness/render_resources.py [LDCT DENOISED SECONDS [REFERENCE]]


Icon: a CT-like slice, left half noisy (low dose) and right half clean (denoised), 128x128.
Screenshot: the real module panel (the .ui loaded through the harness with the real widget code)
beside a linked before/after pair of a simulated low-dose slice, as the Compare layout shows it.
"""

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402

import slicer_harness as H  # noqa: E402

RES = os.path.join(H.REPO_ROOT, "CoreDiffSlicer", "Resources")


def phantomSlice(n, seed=0, noise=60.0):
    """Abdomen-like slice in HU: body, fat rim, liver, kidneys, spine, vessels; + noise."""
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n * 2 - 1
    img = np.full((n, n), -1000.0)
    body = (x / 0.9) ** 2 + (y / 0.68) ** 2 < 1
    img[body] = -100.0  # fat
    img[(x / 0.82) ** 2 + (y / 0.6) ** 2 < 1] = 40.0  # muscle/soft tissue
    img[((x + 0.3) / 0.38) ** 2 + ((y + 0.12) / 0.3) ** 2 < 1] = 60.0  # liver
    for cx in (-0.35, 0.35):
        img[((x - cx) / 0.11) ** 2 + ((y - 0.2) / 0.15) ** 2 < 1] = 150.0  # kidneys
    img[(x / 0.1) ** 2 + ((y - 0.38) / 0.1) ** 2 < 1] = 700.0  # vertebra
    img[(x / 0.06) ** 2 + ((y - 0.38) / 0.06) ** 2 < 1] = 250.0
    img[((x + 0.08) / 0.05) ** 2 + ((y - 0.12) / 0.05) ** 2 < 1] = 200.0  # aorta
    img[((x - 0.35) / 0.2) ** 2 + ((y + 0.2) / 0.14) ** 2 < 1] = 10.0  # bowel
    img[((x - 0.3) / 0.05) ** 2 + ((y + 0.22) / 0.04) ** 2 < 1] = -900.0  # gas
    # correlated (CT-like) noise: smoothed white noise, stronger in the body centre
    white = rng.normal(0, 1, (n, n))
    k = np.exp(-0.5 * (np.arange(-3, 4) / 1.1) ** 2)
    k /= k.sum()
    corr = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 0, white)
    corr = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 1, corr)
    corr /= corr.std()
    noisy = img + noise * corr * body
    smooth = img.copy()
    return noisy, smooth


def toQImage(hu, window=350.0, level=40.0):
    g = np.clip((hu - (level - window / 2)) / window, 0, 1)
    a = np.ascontiguousarray((g * 255).astype(np.uint8))
    img = QtGui.QImage(a.data, a.shape[1], a.shape[0], a.shape[1], QtGui.QImage.Format_Grayscale8)
    return img.copy()


def makeIcon(path):
    noisy, clean = phantomSlice(128, seed=3, noise=70.0)
    half = np.concatenate([noisy[:, :64], clean[:, 64:]], axis=1)
    image = toQImage(half, 400, 40).convertToFormat(QtGui.QImage.Format_ARGB32)
    out = QtGui.QImage(128, 128, QtGui.QImage.Format_ARGB32)
    out.fill(QtCore.Qt.transparent)
    p = QtGui.QPainter(out)
    p.setRenderHint(QtGui.QPainter.Antialiasing)
    clip = QtGui.QPainterPath()
    clip.addRoundedRect(QtCore.QRectF(2, 2, 124, 124), 18, 18)
    p.setClipPath(clip)
    p.drawImage(0, 0, image)
    p.setPen(QtGui.QPen(QtGui.QColor(255, 200, 40), 3))
    p.drawLine(64, 4, 64, 124)
    p.setClipping(False)
    p.setPen(QtGui.QPen(QtGui.QColor(60, 60, 60), 2))
    p.drawPath(clip)
    p.end()
    out.save(path)


def makeScreenshot(path, ldctPath, denoisedPath, seconds, referencePath=None):
    """The real panel beside the real result: the bundled sample LDCT and the shipped model's
    output of it (``scripts/demo.sh`` writes it), with the ROI readout computed from them and,
    given the sample's normal-dose reference, the module's own quality readout against it."""
    import tempfile
    import json
    import subprocess
    import vtk
    import SimpleITK as sitk
    ldct = sitk.GetArrayFromImage(sitk.ReadImage(ldctPath)).astype(np.float32)
    den = sitk.GetArrayFromImage(sitk.ReadImage(denoisedPath)).astype(np.float32)
    k = ldct.shape[0] // 2
    noisy, clean = ldct[k], den[k]
    models = json.loads(subprocess.run([sys.executable, "-m", "CoreDiffLib.cli", "models", "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    default = next(m for m in models if m.get("default"))
    slicer = H.install(tempfile.mkdtemp())
    module = H.loadModule()
    widget = module.CoreDiffSlicerWidget(H.moduleWidgetParent())
    widget.setup()
    for job in list(widget.logic._jobs):
        job.cancel()
    widget._onModelsListed(models, None)
    widget._onDevicesListed([{"name": "cpu", "label": "CPU (2 threads)", "memory_gb": None}], None)
    m = vtk.vtkMatrix4x4()
    node = H.volumeFromArray(ldct.astype(np.int16), m, "Sample abdomen 25% dose")
    p = widget._parameterNode
    p.inputVolume = node
    p.model = ""  # Automatic: --model auto, which picks the default 25 % model for this sample
    p.device = "cpu"
    n = ldct.shape[0]
    widget.ui.compareCollapsibleButton.collapsed = False
    widget.ui.progressBar.setVisible(True)
    widget.ui.progressBar.setMaximum(n)
    widget.ui.progressBar.setValue(n)
    widget.ui.progressBar.setFormat(f"{n} / {n} slices")
    widget.ui.statusLabel.setText(f"Done in {seconds:.0f} s: Sample abdomen 25% dose denoised "
                                  f"({default['name']}, 1 of 10 steps)")
    # ROI: a 24x24 box in the liver of the middle slice (same box drawn on both views)
    y0, x0, r = 236, 150, 24
    before, after = ldct[k, y0:y0 + r, x0:x0 + r], den[k, y0:y0 + r, x0:x0 + r]
    widget.ui.roiResultsLabel.setText(
        f"ROI ({r * r} voxels, slice {k})\nBefore: mean {before.mean():.1f} HU, SD {before.std():.1f} HU\n"
        f"After:  mean {after.mean():.1f} HU, SD {after.std():.1f} HU\n"
        f"Noise (SD) reduced by {100 * (1 - after.std() / before.std()):.0f} %")
    if referencePath:
        reference = sitk.GetArrayFromImage(sitk.ReadImage(referencePath))
        refNode = H.volumeFromArray(reference.astype(np.int16), m, "Sample abdomen normal dose")
        denNode = H.volumeFromArray(den.astype(np.int16), m, "Sample abdomen 25% dose denoised")
        widget.ui.referenceSelector.setCurrentNode(refNode)
        quality = widget.logic.sliceQuality(node, denNode, refNode, sliceIndex=k)
        widget.ui.qualityResultsLabel.setText(module.formatSliceQuality(quality))
    panel = widget.parent
    panel.resize(max(panel.minimumSizeHint().width(), 420), 820)
    panel.show()
    QtWidgets.QApplication.processEvents()
    panelImage = panel.grab().toImage()
    pw = panelImage.width()

    W, Hh = pw + 2 * 440, 820
    shot = QtGui.QImage(W, Hh, QtGui.QImage.Format_RGB32)
    shot.fill(QtGui.QColor(235, 235, 235))
    painter = QtGui.QPainter(shot)
    painter.drawImage(0, 0, panelImage)
    viewW = (W - pw - 6) // 2
    size = noisy.shape[1]
    for idx, (title, color, hu) in enumerate((("Red: Sample abdomen 25% dose", QtGui.QColor(200, 60, 60), noisy),
                                             ("Yellow: Sample abdomen 25% dose denoised", QtGui.QColor(220, 200, 60), clean))):
        xv = pw + 6 + idx * viewW
        painter.fillRect(xv, 0, viewW - 4, 22, color)
        painter.setPen(QtGui.QColor(0, 0, 0))
        painter.drawText(QtCore.QRect(xv + 6, 0, viewW - 10, 22), QtCore.Qt.AlignVCenter, title + "   (linked)")
        painter.fillRect(xv, 22, viewW - 4, Hh - 22, QtGui.QColor(0, 0, 0))
        img = toQImage(hu).scaled(viewW - 4, viewW - 4, QtCore.Qt.KeepAspectRatio, QtCore.Qt.SmoothTransformation)
        top = 22 + (Hh - 22 - img.height()) // 2
        painter.drawImage(xv, top, img)
        painter.setPen(QtGui.QColor(255, 255, 255))
        painter.drawText(QtCore.QRect(xv + 8, Hh - 28, viewW - 20, 20), QtCore.Qt.AlignLeft, "W 350 L 40")
        painter.setPen(QtGui.QPen(QtGui.QColor(60, 160, 255), 2))
        sc = (viewW - 4) / size
        painter.drawRect(int(xv + x0 * sc), int(top + y0 * sc), int(r * sc), int(r * sc))
    painter.end()
    shot.save(path)


if __name__ == "__main__":
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    os.makedirs(os.path.join(RES, "Icons"), exist_ok=True)
    os.makedirs(os.path.join(RES, "Screenshots"), exist_ok=True)
    makeIcon(os.path.join(RES, "Icons", "CoreDiffSlicer.png"))
    # args: LDCT volume, its denoised output, seconds the denoising took (scripts/demo.sh output)
    if len(sys.argv) in (4, 5):
        makeScreenshot(os.path.join(RES, "Screenshots", "CoreDiffSlicer-1.png"), sys.argv[1], sys.argv[2],
                       float(sys.argv[3]), sys.argv[4] if len(sys.argv) == 5 else None)
    print("written")
