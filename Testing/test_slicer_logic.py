"""The module's process machinery against the real `corediff` CLI in a subprocess.

Qt properties are read and written with property()/setProperty(): the module runs with PySide's
true_property feature (PythonQt-like), and PySide may keep that mode active in callers' frames
right after module code ran, so getter/setter methods are avoided here.
"""

import os
import subprocess
import sys

import numpy as np
import psutil
import pytest
import vtk

import slicer_harness as H
from slicer_harness.fixtures import makeVolume, makeWidget, slicerEnv, spin, tinyModel, waitIdle  # noqa: F401


def matrixOf(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijkToRASOf(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return m


def widgetOnTinyModel(module, modelPath):
    """The module's widget set to run the tiny test model on the CPU, and its parameter node."""
    widget = makeWidget(module)
    p = widget._parameterNode
    p.modelFile = __import__("pathlib").Path(modelPath)
    p.device = "cpu"
    return widget, p


def tiltedRoi(slicer):
    """A 20 x 10 mm ROI at 30 degrees to a 64 x 64 volume's axes (IJK = RAS, 1 mm voxels), on slice 1,
    and which voxels of a slice lie inside it."""
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "tilted")
    roi.SetCenter(31.0, 30.0, 1.0)
    roi.SetSize(20.0, 10.0, 0.5)
    angle = np.radians(30)
    axes = roi.GetObjectToNodeMatrix()
    for r, row in enumerate([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]):
        for c, value in enumerate(row):
            axes.SetElement(r, c, value)
    roi.Modified()
    jj, ii = np.mgrid[0:64, 0:64]
    u = (ii - 31.0) * np.cos(angle) + (jj - 30.0) * np.sin(angle)  # the voxel centres in the ROI's axes
    v = -(ii - 31.0) * np.sin(angle) + (jj - 30.0) * np.cos(angle)
    return roi, (np.abs(u) <= 10.0) & (np.abs(v) <= 5.0)


def cliHas(subcommand):
    r = subprocess.run([sys.executable, "-m", "CoreDiffLib.cli", subcommand, "--help"], cwd=H.REPO_ROOT,
                       capture_output=True, encoding="utf-8")
    return r.returncode == 0


def test_denoise_button_creates_new_node_with_input_geometry(slicerEnv, tinyModel):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    widget = makeWidget(module)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "Patient 1")
    inputNode, _ = makeVolume((4, 64, 64))
    sh.SetItemParent(sh.GetItemByDataNode(inputNode), folder)
    before = slicer.util.arrayFromVolume(inputNode).copy()
    p = widget._parameterNode
    assert p.inputVolume is inputNode
    widget.ui.modelPathLineEdit.currentPath = tinyModel
    assert str(p.modelFile) == tinyModel
    p.autoSteps = False  # a chosen number of steps reaches the CLI
    p.steps = 2
    p.device = "cpu"
    progressValues = []
    widget.ui.progressBar.valueChanged.connect(lambda v: progressValues.append(
        (v, widget.ui.progressBar.property("maximum"), widget.ui.progressBar.property("format"))))
    nodesBefore = slicer.mrmlScene.GetNumberOfNodes()

    widget.ui.applyButton.click()
    assert widget.ui.applyButton.property("text") == "Cancel"
    args = H.launched[-1].args
    assert args[:3] == [sys.executable, "-m", "CoreDiffLib.cli"] and args[3] == "denoise"
    assert ["--model", tinyModel] == args[args.index("--model"):args.index("--model") + 2]
    assert ["--steps", "2"] == [str(a) for a in args[args.index("--steps"):args.index("--steps") + 2]]
    assert "--progress" in args and "lines" in args
    assert "--context" not in args  # automatic by default: the library decides from the slice spacing
    spin(slicer, lambda: not widget._job.running, timeout=90)

    assert widget.ui.applyButton.property("text") == "Denoise"
    assert widget.ui.statusLabel.property("text").startswith("Done"), widget.ui.statusLabel.property("text")
    outputNode = slicer.mrmlScene.GetFirstNodeByName("LDCT denoised")
    assert outputNode is not None and outputNode is not inputNode
    # what made it: on the node (saved with the scene) and in the status line
    modelName = os.path.splitext(os.path.basename(tinyModel))[0]
    assert outputNode.GetAttribute("CoreDiff.model") == modelName
    assert outputNode.GetAttribute("CoreDiff.steps") == "2 of 2"  # the fixture model has T = 2
    assert f"({modelName}, 2 of 2 steps)" in widget.ui.statusLabel.property("text")
    assert slicer.mrmlScene.GetNumberOfNodes() == nodesBefore + 2  # volume + display node
    np.testing.assert_array_equal(matrixOf(outputNode), matrixOf(inputNode))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(inputNode), before)
    out = slicer.util.arrayFromVolume(outputNode)
    assert out.shape == before.shape and out.dtype == before.dtype and np.isfinite(out).all()  # the input's type
    # progress reached total (4 slices), with slices done / total and time left shown
    assert progressValues and progressValues[-1][0] == progressValues[-1][1] == 4
    assert "4 / 4 slices" in progressValues[-1][2]
    # beside the input, CT window, side-by-side comparison
    assert sh.GetItemParent(sh.GetItemByDataNode(outputNode)) == folder
    d = outputNode.GetDisplayNode()
    assert (d.GetWindow(), d.GetLevel(), d.GetAutoWindowLevel()) == (350.0, 40.0, 0)
    lm = slicer.app.layoutManager()
    assert lm.layout == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    red = lm.sliceWidget("Red").mrmlSliceCompositeNode()
    yellow = lm.sliceWidget("Yellow").mrmlSliceCompositeNode()
    assert red.GetBackgroundVolumeID() == inputNode.GetID()
    assert yellow.GetBackgroundVolumeID() == outputNode.GetID()
    # linked and hot-linked: the views pan, zoom and scroll together while the mouse drags, not after it
    assert red.GetLinkedControl() and yellow.GetLinkedControl()
    assert red.GetHotLinkedControl() and yellow.GetHotLinkedControl()
    assert inputNode.GetDisplayNode().GetWindow() == 350.0
    assert os.listdir(tempDir) == []  # temp NRRDs removed

    # flicker alternates the output over the input in the Red view
    widget.ui.flickerButton.setProperty("checked", True)
    seen = set()
    spin(slicer, lambda: seen.add(red.GetForegroundOpacity()) or len(seen) == 2, timeout=5)
    assert red.GetForegroundVolumeID() == outputNode.GetID()
    widget.ui.flickerButton.setProperty("checked", False)
    assert red.GetForegroundVolumeID() is None
    # leaving the module stops a flicker: the views belong to the other modules then
    widget.ui.flickerButton.setProperty("checked", True)
    widget.exit()
    assert not widget._flickerTimer.isActive() and red.GetForegroundVolumeID() is None
    widget.enter()

    # ROI noise readout: an ROI on the central region of slice 2
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "noise ROI")
    ijkToRAS = vtk.vtkMatrix4x4()
    inputNode.GetIJKToRASMatrix(ijkToRAS)
    roi.SetCenter(ijkToRAS.MultiplyPoint([31.5, 31.5, 2, 1])[:3])
    roi.SetSize(10, 10, 1)
    widget.ui.roiSelector.setCurrentNode(roi)
    assert widget._parameterNode.roi is roi
    widget.ui.measureButton.click()
    text = widget.ui.roiResultsLabel.property("text")
    beforeLine, afterLine = text.splitlines()[1:3]
    assert beforeLine.startswith("Before: mean") and beforeLine.endswith(" HU (LDCT)") and "noise ROI" in text
    assert afterLine.startswith("After:  mean") and afterLine.endswith(" HU (LDCT denoised)")  # figures line up
    stats = widget.logic.roiStatistics(inputNode, outputNode, roi)
    assert stats["ijkMin"][2] == stats["ijkMax"][2] == 2
    k0, j0, i0 = stats["ijkMin"][2], stats["ijkMin"][1], stats["ijkMin"][0]
    k1, j1, i1 = stats["ijkMax"][2], stats["ijkMax"][1], stats["ijkMax"][0]
    kk, jj, ii = np.mgrid[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1]  # the box around the ROI in this oblique volume...
    ras = matrixOf(inputNode) @ np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
    centre = ijkToRAS.MultiplyPoint([31.5, 31.5, 2, 1])[:3]
    inside = (np.abs(ras[:3] - np.reshape(centre, (3, 1))) <= np.reshape([5, 5, 0.5], (3, 1)) + 1e-6).all(axis=0)
    region = before[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1].astype(float).ravel()[inside]  # ...less its corners
    assert stats["voxels"] == inside.sum() < ii.size
    assert stats["before"]["std"] == pytest.approx(region.std())
    assert stats["before"]["mean"] == pytest.approx(region.mean())
    assert [m for m in H.displayed if m[0] == "error"] == []

    # the result is the output selector's now: a second run replaces it (no 'LDCT denoised_1'),
    # and a reloaded module (a new widget on the saved scene) still has the pair to compare
    assert p.outputVolume is outputNode
    nodesAfter = slicer.mrmlScene.GetNumberOfNodes()
    widget.ui.applyButton.click()
    spin(slicer, lambda: not widget._job.running, timeout=90)
    assert widget._job.succeeded and slicer.mrmlScene.GetNumberOfNodes() == nodesAfter
    assert p.outputVolume is outputNode and slicer.mrmlScene.GetFirstNodeByName("LDCT denoised_1") is None
    assert makeWidget(module)._comparisonPair() == (inputNode, outputNode)


def test_the_context_choice_reaches_the_library_and_the_result_says_what_it_was(slicerEnv, tinyModel):  # noqa: F811
    slicer, module, _ = slicerEnv
    widget = makeWidget(module)
    inputNode, _ = makeVolume((4, 48, 48))  # 2.5 mm apart: automatic would give the neighbours
    p = widget._parameterNode
    p.modelFile = __import__("pathlib").Path(tinyModel)
    p.device = "cpu"
    combo = widget.ui.contextComboBox
    assert [combo.itemData(i) for i in range(combo.count)] == ["auto", "neighbours", "own"]
    assert p.context == "auto" and combo.itemData(combo.currentIndex) == "auto"
    combo.currentIndex = combo.findData("own")
    assert p.context == "own"
    widget.ui.applyButton.click()
    args = [str(a) for a in H.launched[-1].args]
    assert args[args.index("--context") + 1] == "own"
    spin(slicer, lambda: not widget._job.running, timeout=90)
    node = slicer.mrmlScene.GetFirstNodeByName("LDCT denoised")
    assert node.GetAttribute("CoreDiff.context") == "each slice itself"
    assert "each slice its own context" in widget.ui.statusLabel.property("text")
    p.context = "neighbours"  # written from the parameter node, shown in the combo box
    assert combo.itemData(combo.currentIndex) == "neighbours"
    with pytest.raises(ValueError, match="context must be one of"):
        widget.logic.startDenoise(inputNode, context="sideways")


def test_preview_denoises_the_red_slice_as_the_whole_run_would(slicerEnv, tinyModel):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    widget = makeWidget(module)
    inputNode, _ = makeVolume((6, 48, 48))
    before = slicer.util.arrayFromVolume(inputNode).copy()
    p = widget._parameterNode
    p.modelFile = __import__("pathlib").Path(tinyModel)
    p.device = "cpu"
    logic = widget.logic
    lm = slicer.app.layoutManager()
    red = lm.sliceWidget("Red").mrmlSliceNode()
    red.SetFieldOfView(40.0, 40.0, 2.5)
    previews, nodeCounts = [], []
    for k in (2, 5):  # an inner slice, then the last one (its missing neighbour is replicated)
        logic.setRedSliceIndex(inputNode, k)
        assert widget.ui.previewButton.property("enabled")
        widget.ui.previewButton.click()
        assert not widget.ui.previewButton.property("enabled")  # one run at a time
        args = [str(a) for a in H.launched[-1].args]
        assert args[args.index("--slices") + 1] == str(k)
        spin(slicer, lambda: not widget._job.running, timeout=90)
        status = widget.ui.statusLabel.property("text")
        assert status.startswith(f"Preview of slice {k}"), status
        node = slicer.mrmlScene.GetFirstNodeByName("LDCT preview")
        assert node is not None and node is widget._previewNode
        array = slicer.util.arrayFromVolume(node)
        assert array.shape == (1, 48, 48)
        expected = matrixOf(inputNode)
        expected[:3, 3] += expected[:3, 2] * k  # placed where slice k lies
        np.testing.assert_allclose(matrixOf(node), expected, atol=1e-9)
        previews.append(array.copy())
        nodeCounts.append(slicer.mrmlScene.GetNumberOfNodes())
        # shown beside the input, in the same plane and zoom as the Red view
        assert lm.sliceWidget("Yellow").mrmlSliceCompositeNode().GetBackgroundVolumeID() == node.GetID()
        yellow = lm.sliceWidget("Yellow").mrmlSliceNode()
        np.testing.assert_array_equal(
            [[yellow.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(4)],
            [[red.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
        assert yellow.GetFieldOfView() == (40.0, 40.0, 2.5)
    assert nodeCounts[0] == nodeCounts[1]  # the second preview reused the first one's node
    assert widget._lastPair is None  # Compare / flicker / ROI stay with whole-volume runs
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(inputNode), before)
    assert os.listdir(tempDir) == []

    fits = lm.sliceWidget("Red").sliceLogic().fitCount
    widget.ui.applyButton.click()  # the whole volume: the previews are its slices 2 and 5
    spin(slicer, lambda: not widget._job.running, timeout=90)
    full = slicer.util.arrayFromVolume(slicer.mrmlScene.GetFirstNodeByName("LDCT denoised"))
    # the Red view was on slice 5 of the input: the result is shown there, not at the middle slice
    assert lm.sliceWidget("Red").sliceLogic().fitCount == fits and logic.redSliceIndex(inputNode) == 5
    np.testing.assert_array_equal(
        [[yellow.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(4)],
        [[red.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
    # (within 1 HU: a batch of one may round a voxel of the int16 output the other way)
    np.testing.assert_allclose(previews[0][0], full[2], atol=1.0)
    np.testing.assert_allclose(previews[1][0], full[5], atol=1.0)
    assert not np.array_equal(full[2], full[3])
    assert [m for m in H.displayed if m[0] == "error"] == []


def test_preview_of_a_sagittally_stored_volume_takes_an_axial_plane(slicerEnv, tinyModel):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    module.CoreDiffSlicerWidget  # noqa: B018 (the logic alone, as a script would use it)
    logic = module.CoreDiffSlicerLogic()
    rng = np.random.default_rng(1)
    # IJK axis i runs head-foot (S), j anterior-posterior, k left-right; the array is indexed [k, j, i]
    array = rng.normal(0, 40, (20, 24, 5)) - 200
    array[:, :4] = rng.normal(-1000, 40, (20, 4, 5))  # air in front of the body
    array = array.astype(np.int16)
    m = vtk.vtkMatrix4x4()
    for r, row in enumerate([[0, 0, 1.0, -10], [0, 0.9, 0, 5], [2.0, 0, 0, -40]]):
        for c in range(4):
            m.SetElement(r, c, row[c])
    inputNode = H.volumeFromArray(array, m, "sagittal")
    assert logic.axialAxis(inputNode) == 0
    preview = logic.denoise(inputNode, modelFile=tinyModel, device="cpu", timeout=90, sliceIndex=3)
    full = logic.denoise(inputNode, modelFile=tinyModel, device="cpu", timeout=90)
    got = slicer.util.arrayFromVolume(preview)
    assert got.shape == (20, 24, 1)
    np.testing.assert_allclose(got[:, :, 0], slicer.util.arrayFromVolume(full)[:, :, 3], atol=1.0)
    expected = matrixOf(inputNode)
    expected[:3, 3] += expected[:3, 0] * 3
    np.testing.assert_allclose(matrixOf(preview), expected, atol=1e-9)
    with pytest.raises(ValueError, match="outside the volume's 0..4"):
        logic.denoise(inputNode, modelFile=tinyModel, device="cpu", timeout=90, sliceIndex=5)
    assert os.listdir(tempDir) == []


def _rotatedVolume(shape, spacing, degrees, name):
    """A noisy cylinder whose IJK axes j and k are rotated ``degrees`` about R (an oblique scan)."""
    t = np.deg2rad(degrees)
    cols = [np.array([1, 0, 0]), np.array([0, np.cos(t), -np.sin(t)]), np.array([0, np.sin(t), np.cos(t)])]
    m = vtk.vtkMatrix4x4()
    for c in range(3):
        for r in range(3):
            m.SetElement(r, c, cols[c][r] * spacing[c])
    nk, nj, ni = shape
    j, i = np.mgrid[0:nj, 0:ni]
    image = np.where(np.hypot(i - ni / 2, j - nj / 2) < ni * 0.4, 0.0, -1000.0)
    array = (image[None] + np.random.default_rng(0).normal(0, 40, shape)).astype(np.int16)
    return H.volumeFromArray(array, m, name)


def test_module_and_library_agree_on_the_axial_planes_of_oblique_and_thin_volumes(slicerEnv, tinyModel):  # noqa: F811
    """The preview takes its slice across the axis the library denoises along, also where a
    nearest-axis guess differs: a 60-degree oblique scan, and a sagittal slab too thin to give
    axial planes of 16 pixels (the library keeps its stored planes)."""
    from CoreDiffLib.orientation import axial_layout
    slicer, module, tempDir = slicerEnv
    logic = module.CoreDiffSlicerLogic()
    oblique = _rotatedVolume((12, 40, 40), (0.7, 0.7, 5.0), 60, "oblique")
    m = vtk.vtkMatrix4x4()
    for r, row in enumerate([[0, 0, 3.0, 0], [0.5, 0, 0, 0], [0, 0.5, 0, 0]]):  # k runs R-L: 10 sagittal slices
        for c in range(4):
            m.SetElement(r, c, row[c])
    thin = H.volumeFromArray(slicer.util.arrayFromVolume(oblique)[:10].copy(), m, "thin sagittal")
    for node in (oblique, thin):
        _, _, direction = logic.lpsGeometry(node)
        layout = axial_layout(direction, slicer.util.arrayFromVolume(node).shape)
        axis = logic.axialAxis(node)
        assert axis == (2 if layout is None else 2 - layout.perm[0])
        preview = logic.denoise(node, modelFile=tinyModel, device="cpu", timeout=120, sliceIndex=5)
        expected = list(slicer.util.arrayFromVolume(node).shape)
        expected[2 - axis] = 1
        assert slicer.util.arrayFromVolume(preview).shape == tuple(expected)
    assert logic.axialAxis(thin) == 2  # kept as stored, as the library keeps it
    assert os.listdir(tempDir) == []


def test_readouts_take_the_axial_plane_of_a_sagittally_stored_volume(slicerEnv):  # noqa: F811
    """ROI box and slice metrics measure the plane the Red (axial) view shows, whichever IJK
    axis runs head-foot; a Red view centred off the volume gives no slice rather than an edge one."""
    slicer, module, tempDir = slicerEnv
    logic = module.CoreDiffSlicerLogic()
    rng = np.random.default_rng(1)
    array = (rng.normal(0, 40, (20, 24, 30)) - 200).astype(np.int16)  # [k = R, j = A, i = S]
    m = vtk.vtkMatrix4x4()
    for r, row in enumerate([[0, 0, 1.0, -10], [0, 0.9, 0, 5], [2.0, 0, 0, -40]]):
        for c in range(4):
            m.SetElement(r, c, row[c])
    node = H.volumeFromArray(array, m, "sagittal")
    other = H.volumeFromArray((array + 100).astype(np.int16), m, "other")
    assert logic.axialAxis(node) == 0
    red = logic.redSliceNode()
    red.JumpSliceByCentering(*m.MultiplyPoint([7, 12, 3, 1])[:3])  # the axial plane i = 7
    assert logic.redSliceIndex(node) == 7
    stats = logic.roiStatistics(node, other)
    assert stats["where"] == "central box on slice 7"
    assert stats["ijkMin"][0] == stats["ijkMax"][0] == 7  # one axial plane, a box across j and k
    assert stats["ijkMax"][1] > stats["ijkMin"][1] and stats["ijkMax"][2] > stats["ijkMin"][2]
    box = array[stats["ijkMin"][2]:stats["ijkMax"][2] + 1, stats["ijkMin"][1]:stats["ijkMax"][1] + 1, 7]
    assert stats["before"]["mean"] == pytest.approx(float(box.mean()))
    from CoreDiffLib.metrics import slice_metrics
    quality = logic.sliceQuality(node, other, node)
    assert quality["slice"] == 7 and quality["output"] == slice_metrics(array[:, :, 7] + 100.0, array[:, :, 7])
    red.JumpSliceByCentering(*m.MultiplyPoint([45, 12, 3, 1])[:3])  # below the volume's last plane
    assert logic.redSliceIndex(node) is None
    assert logic.measuredSlice(node) == 15  # the readouts fall back to the middle plane


def test_a_timeout_stops_the_run_and_a_reused_output_keeps_no_old_provenance(slicerEnv, tinyModel):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    logic = module.CoreDiffSlicerLogic()
    inputNode, m = makeVolume((8, 64, 64))
    nodes = slicer.mrmlScene.GetNumberOfNodes()
    with pytest.raises(TimeoutError):
        logic.denoise(inputNode, modelFile=tinyModel, device="cpu", timeout=0.3)
    assert logic._jobs == [] and os.listdir(tempDir) == []  # stopped, not left to finish behind the caller
    for _ in range(20):
        slicer.app.processEvents()
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes
    # a reused node of another size, on an identity grid, under a transform of its own, with an
    # earlier run's provenance: it takes the input's grid and transform, and none of what it had
    out = H.volumeFromArray(np.zeros((3, 16, 16), np.int16), vtk.vtkMatrix4x4(), "result")
    elsewhere = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "elsewhere")
    out.SetAndObserveTransformNodeID(elsewhere.GetID())
    out.SetAttribute("CoreDiff.model_choice", "auto: from an earlier run")  # what an Automatic run leaves
    out.SetAttribute("CoreDiff.model", "corediff-25-w32")
    out.SetAttribute("CoreDiff.adaptation", "an earlier adaptation")
    out.SetAttribute("Other.kept", "yes")
    kept = slicer.util.arrayFromVolume(inputNode).copy()
    logic.denoise(inputNode, out, modelFile=tinyModel, device="cpu", timeout=120)
    assert out.GetAttribute("CoreDiff.model_choice") is None and out.GetAttribute("CoreDiff.model") == "tiny"
    assert out.GetAttribute("CoreDiff.adaptation") is None and out.GetAttribute("Other.kept") == "yes"
    assert out.GetTransformNodeID() == inputNode.GetTransformNodeID()
    grid = ijkToRASOf(out)
    assert all(grid.GetElement(r, c) == pytest.approx(m.GetElement(r, c)) for r in range(4) for c in range(4))
    assert slicer.util.arrayFromVolume(out).shape == (8, 64, 64)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(inputNode), kept)


def test_scene_close_during_a_run_adds_nothing_a_deleted_output_volume_loses_no_work(slicerEnv, tinyModel):  # noqa: F811
    """The output volume deleted during a run (the selector then shows "Create new volume") threw
    the finished run away with an error; the result goes into a new volume."""
    slicer, module, tempDir = slicerEnv
    widget = makeWidget(module)
    inputNode, m = makeVolume((8, 64, 64))
    out = H.volumeFromArray(np.zeros((8, 64, 64), np.int16), m, "my output")
    p = widget._parameterNode
    p.modelFile = __import__("pathlib").Path(tinyModel)
    p.device = "cpu"
    p.outputVolume = out
    widget.ui.applyButton.click()
    job = widget._job
    slicer.mrmlScene.RemoveNode(out)  # deleted while it runs
    spin(slicer, lambda: job.finished, timeout=120)
    status = widget.ui.statusLabel.property("text")
    result = slicer.mrmlScene.GetFirstNodeByName("LDCT denoised")
    assert status.startswith("Done in ") and "LDCT denoised" in status, status
    assert result is not None and p.outputVolume is result and result.GetNodeReferenceID("CoreDiffInput") == \
        inputNode.GetID()
    assert slicer.util.arrayFromVolume(result).shape == (8, 64, 64)
    assert widget.ui.applyButton.property("text") == "Denoise"

    p = widget._parameterNode
    p.outputVolume = None
    widget.ui.applyButton.click()
    job = widget._job
    assert job.running
    slicer.mrmlScene.Clear()  # File > Close Scene: the run is stopped, nothing lands in the next scene
    assert job.finished and job.cancelled
    for _ in range(20):
        slicer.app.processEvents()
    assert not any(n.IsA("vtkMRMLVolumeNode") for n in slicer.mrmlScene._nodes)
    assert os.listdir(tempDir) == []


def test_readouts_stay_with_the_selected_scan_and_a_flicker_stops_when_its_volume_goes(slicerEnv, tinyModel):  # noqa: F811,E501
    """From a review: with patient A selected, Measure noise and Compare used the last run's pair,
    patient B's, under A's selection; Denoise of A then made 'A denoised_1' beside 'A denoised';
    a flicker kept pointing the Red view at a deleted volume."""
    slicer, module, tempDir = slicerEnv
    widget, p = widgetOnTinyModel(module, tinyModel)
    a, _ = makeVolume((4, 64, 64), name="PatientA", seed=1)
    b, _ = makeVolume((4, 64, 64), name="PatientB", seed=2, noiseSD=80)
    results = {}
    for node in (a, b):
        p.inputVolume = node
        widget.ui.applyButton.click()
        spin(slicer, lambda: not widget._job.running, timeout=120)
        results[node.GetName()] = p.outputVolume
    assert results["PatientB"].GetName() == "PatientB denoised" and widget._lastPair[0] is b
    p.inputVolume = a  # its own earlier result is selected again: the next Denoise replaces it
    assert p.outputVolume is results["PatientA"] and widget._comparisonPair() == (a, results["PatientA"])
    p.outputVolume = None  # "Create new volume": a second result of A, which is then A's latest
    widget.ui.applyButton.click()
    spin(slicer, lambda: not widget._job.running, timeout=120)
    second = p.outputVolume
    assert second.GetName() == "PatientA denoised_1" and widget.logic.resultOf(a) is second
    p.inputVolume = b
    p.inputVolume = a
    assert p.outputVolume is second
    slicer.mrmlScene.RemoveNode(second)
    preview = slicer.util.addVolumeFromArray(np.zeros((1, 64, 64), np.int16), name="PatientA preview")
    preview.SetNodeReferenceID("CoreDiffInput", a.GetID())
    preview.SetAttribute("CoreDiff.slices", "2:3 of 4")  # the provenance a preview's file gives it
    assert widget.logic.resultOf(a) is results["PatientA"]  # a one-slice preview is no result to replace
    slicer.mrmlScene.RemoveNode(results["PatientA"])
    p.inputVolume = b
    p.inputVolume = a  # no result of A any more: "Create new volume", and nothing to compare
    widget._lastPair = (b, results["PatientB"])  # as when B's was the last run: still not A's
    assert p.outputVolume is None and widget._comparisonPair() is None
    widget.ui.measureButton.click()  # refused (an error dialog), not B's noise under A's name
    assert "PatientB" not in (widget.ui.roiResultsLabel.property("text") or "")
    # the readout names the volumes it measured
    p.inputVolume = b
    assert p.outputVolume is results["PatientB"]
    widget.ui.measureButton.click()
    text = widget.ui.roiResultsLabel.property("text")
    assert text.splitlines()[1].endswith("(PatientB)") and text.splitlines()[2].endswith("(PatientB denoised)"), text
    # a flicker whose result is deleted stops, and leaves no foreground behind
    red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
    widget.ui.flickerButton.setProperty("checked", True)
    spin(slicer, lambda: red.GetForegroundVolumeID() == results["PatientB"].GetID(), timeout=5)
    slicer.mrmlScene.RemoveNode(results["PatientB"])
    spin(slicer, lambda: not widget._flickerTimer.property("active"), timeout=5)
    assert not widget.ui.flickerButton.property("checked") and red.GetForegroundVolumeID() is None
    assert red.GetBackgroundVolumeID() == b.GetID()


def test_one_run_at_a_time_and_the_wizard_follows_the_scene(slicerEnv, tinyModel):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    widget = makeWidget(module)
    ui = widget.ui
    ldct, m = makeVolume((16, 64, 64), name="LDCT10")
    ndct, _ = makeVolume((16, 64, 64), name="NDCT", seed=3)
    p = widget._parameterNode
    p.modelFile = __import__("pathlib").Path(tinyModel)
    p.device = "cpu"
    # the adaptation name is proposed from the volume, and can be cleared to type another
    ui.oneShotLdctSelector.setCurrentNode(ldct)
    assert p.osName == "LDCT10_oneshot"
    ui.oneShotNameLineEdit.setProperty("text", "")
    assert ui.oneShotNameLineEdit.property("text") == "" and not ui.oneShotAdaptButton.property("enabled")
    ui.oneShotNameLineEdit.setProperty("text", "mine")
    ui.oneShotLdctSelector.setCurrentNode(ndct)  # another volume keeps a name the user typed
    assert p.osName == "mine"
    ui.oneShotLdctSelector.setCurrentNode(ldct)
    ui.oneShotNdctSelector.setCurrentNode(ndct)
    widget._lastAdaptation = ("mine", "/nonexistent/mine.json")  # as after a successful adaptation
    widget._setOneShotStep(4)
    assert ui.oneShotApplyButton.property("enabled")
    # while a denoising run goes, nothing else starts: Cancel must reach the run it names
    ui.applyButton.click()
    first = widget._job
    assert first.running
    assert not ui.oneShotApplyButton.property("enabled") and not ui.oneShotAdaptButton.property("enabled")
    widget.onOneShotApply()
    widget.onOneShotAdapt()
    widget.onPreviewButton()
    assert widget._job is first and widget._oneShotJob is None
    assert sum(1 for proc in H.launched if proc.poll() is None) == 1
    ui.applyButton.click()  # at once: a double-click's second click on Denoise-become-Cancel
    assert first.running and not first.cancelled
    first.startTime -= 1.0  # a moment later
    ui.applyButton.click()  # Cancel
    assert first.cancelled and ui.oneShotApplyButton.property("enabled")
    # the low-dose volume deleted: the wizard cannot apply to it
    slicer.mrmlScene.RemoveNode(ldct)
    assert not ui.oneShotApplyButton.property("enabled")
    widget.onOneShotApply()
    assert widget._job is first
    # the flicker and the wizard do not outlive the scene
    b = H.volumeFromArray(np.zeros((16, 64, 64), np.int16), m, "B")
    widget._lastPair = (ndct, b)
    ui.flickerButton.setProperty("checked", True)
    slicer.mrmlScene.Clear()
    assert not ui.flickerButton.property("checked") and not widget._flickerTimer.property("active")
    assert widget._lastAdaptation is None and ui.oneShotStack.property("currentIndex") == 0
    assert [m for m in H.displayed if m[0] == "error"] == []


def test_a_preview_of_another_scan_gets_its_own_node(slicerEnv, tinyModel):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    widget, p = widgetOnTinyModel(module, tinyModel)
    names = []
    for name, seed in (("PatientA", 0), ("PatientB", 5)):
        node, _ = makeVolume((4, 48, 48), name=name, seed=seed)
        p.inputVolume = node
        widget.logic.setRedSliceIndex(node, 1)
        widget.ui.previewButton.click()
        spin(slicer, lambda: not widget._job.running, timeout=120)
        names.append(widget._previewNode.GetName())
    assert names == ["PatientA preview", "PatientB preview"]
    assert slicer.mrmlScene.GetFirstNodeByName("PatientA preview") is not None


def test_quality_against_a_reference_scan_scores_the_red_slice(slicerEnv):  # noqa: F811
    """A phantom study: the normal-dose scan on the same grid scores input and result by the
    library's metrics (the paper's window), on the slice the Red view shows."""
    from CoreDiffLib.metrics import slice_metrics
    slicer, module, tempDir = slicerEnv
    widget = makeWidget(module)
    inputNode, m = makeVolume((5, 64, 64), noiseSD=40.0)
    clean = np.where(slicer.util.arrayFromVolume(inputNode) > -500, 0, -1000).astype(np.int16)
    referenceNode = H.volumeFromArray(clean, m, "NDCT")
    rng = np.random.default_rng(3)
    outputNode = H.volumeFromArray((clean + rng.normal(0, 10, clean.shape)).astype(np.int16), m, "LDCT denoised")
    p = widget._parameterNode
    p.inputVolume, p.outputVolume = inputNode, outputNode
    widget.ui.qualityButton.click()
    assert widget.ui.qualityResultsLabel.property("text") == "Select the normal-dose reference scan first."
    widget.ui.referenceSelector.setCurrentNode(referenceNode)
    assert p.referenceVolume is referenceNode
    widget.logic.setRedSliceIndex(inputNode, 3)
    widget.ui.qualityButton.click()
    text = widget.ui.qualityResultsLabel.property("text")
    assert text.startswith("Slice 3 against NDCT"), text
    quality = widget.logic.sliceQuality(inputNode, outputNode, referenceNode)
    want = slice_metrics(slicer.util.arrayFromVolume(outputNode)[3], clean[3])
    assert quality["slice"] == 3 and quality["output"] == want
    assert f"Result: PSNR {want.psnr:.2f} dB, SSIM {want.ssim:.4f}, RMSE {want.rmse_hu:.1f} HU (LDCT denoised)" in text
    assert text.splitlines()[1].startswith("Input:  PSNR ") and text.splitlines()[1].endswith(" HU (LDCT)")
    assert quality["output"].psnr > quality["input"].psnr + 6  # a quarter of the noise SD: +12 dB
    # a reference on another grid is refused with what to do
    shifted = vtk.vtkMatrix4x4()
    shifted.DeepCopy(m)
    shifted.SetElement(2, 3, m.GetElement(2, 3) + 2.5)
    widget.ui.referenceSelector.setCurrentNode(H.volumeFromArray(clean, shifted, "NDCT shifted"))
    widget.ui.qualityButton.click()
    assert "is not on the voxel grid of 'LDCT'" in widget.ui.qualityResultsLabel.property("text")
    assert [m for m in H.displayed if m[0] == "error"] == []


def test_a_transformed_input_keeps_its_transform_and_its_slices(slicerEnv, tinyModel):  # noqa: F811
    """A registered scan sits under a transform: results go under the same one, and the Red
    view's slice, the preview and the ROI are found in world coordinates."""
    slicer, module, tempDir = slicerEnv
    logic = module.CoreDiffSlicerLogic()
    inputNode, ijkToRAS = makeVolume((8, 48, 48))
    toWorld = vtk.vtkMatrix4x4()  # 90 degrees about S, then 7.5 mm (3 slices) up
    for r, row in enumerate([[0, -1, 0, 20.0], [1, 0, 0, -5.0], [0, 0, 1, 7.5]]):
        for c in range(4):
            toWorld.SetElement(r, c, row[c])
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    transform.SetMatrixTransformToParent(toWorld)
    inputNode.SetAndObserveTransformNodeID(transform.GetID())
    logic.setRedSliceIndex(inputNode, 2)
    red = logic.redSliceNode().GetSliceToRAS()
    local = ijkToRAS.MultiplyPoint([23.5, 23.5, 2, 1])
    world = toWorld.MultiplyPoint(local)
    assert [red.GetElement(i, 3) for i in range(3)] == pytest.approx(world[:3])  # the view moved in the world
    assert logic.redSliceIndex(inputNode) == 2

    full = logic.denoise(inputNode, modelFile=tinyModel, device="cpu", timeout=90)
    preview = logic.denoise(inputNode, modelFile=tinyModel, device="cpu", timeout=90,
                            sliceIndex=logic.redSliceIndex(inputNode))
    for node in (full, preview):
        assert node.GetTransformNodeID() == transform.GetID()
    np.testing.assert_allclose(slicer.util.arrayFromVolume(preview)[0], slicer.util.arrayFromVolume(full)[2], atol=1.0)

    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "noise ROI")
    roi.SetCenter(world[:3])  # drawn in the views: world coordinates
    roi.SetSize(6, 6, 1)
    stats = logic.roiStatistics(inputNode, full, roi)
    assert stats["ijkMin"][2] == stats["ijkMax"][2] == 2
    assert abs(stats["ijkMin"][0] - 21) <= 2 and abs(stats["ijkMin"][1] - 21) <= 2
    assert os.listdir(tempDir) == []


def test_automatic_model_choice_reaches_the_cli(slicerEnv):  # noqa: F811
    """'Automatic', first in the model list, leaves the choice to the CLI (`--model auto` by default)."""
    slicer, module, tempDir = slicerEnv
    widget = makeWidget(module)
    widget.refreshModelsAndDevices()  # (makeWidget cancels the first listing)
    waitIdle(slicer, widget, timeout=90)  # the list is filled from `corediff models --json`
    combo = widget.ui.modelComboBox
    labels = [combo.itemText(i) for i in range(combo.property("count"))]
    assert labels[0] == "Automatic: the model for the scan's dose" and combo.itemData(0) == ""
    assert "corediff-10-w32 (10 % dose)" in labels  # each shipped model can still be chosen
    assert widget._parameterNode.model == ""
    assert widget.logic.modelArguments("") == []
    assert widget.logic.modelArguments("model:corediff-10-w32") == ["--model", "corediff-10-w32"]


def test_cancel_stops_process_tree_and_leaves_scene_unchanged(slicerEnv, tinyModel):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    widget = makeWidget(module)
    inputNode, _ = makeVolume((64, 128, 128))
    p = widget._parameterNode
    p.modelFile = __import__("pathlib").Path(tinyModel)
    p.autoSteps = False
    p.steps = 2
    p.batchSize = 1
    p.device = "cpu"
    nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
    widget.ui.applyButton.click()
    job = widget._job
    spin(slicer, lambda: job.done >= 1 or job.finished, timeout=90)  # mid-run: first slices done
    assert not job.finished, job.errorMessage
    assert job.done < job.total
    proc = psutil.Process(job.proc.pid)
    family = [proc] + proc.children(recursive=True)
    assert os.listdir(tempDir) != []
    widget.ui.applyButton.click()  # the Denoise button is Cancel while running
    assert job.finished and job.cancelled
    for ps in family:
        assert not ps.is_running() or ps.status() == psutil.STATUS_ZOMBIE
    assert slicer.mrmlScene.GetNumberOfNodes() == nodesBefore
    assert os.listdir(tempDir) == []
    assert widget.ui.applyButton.property("text") == "Denoise"
    assert "Cancelled" in widget.ui.statusLabel.property("text")
    assert H.displayed == []


def test_the_process_reader_survives_bad_bytes_and_a_kill_is_named(slicerEnv):  # noqa: F811
    """One undecodable byte ended the reading (no progress, the error lost, and a child that
    wrote on would block on the full pipe); a killed run showed its last, unrelated, line."""
    slicer, module, tempDir = slicerEnv
    script = ("import sys, os, signal\n"
              "out = sys.stdout.buffer\n"
              "out.write(b'caf\\xe9 is a name\\n'); out.flush()\n"
              "for k in range(1, 6):\n"
              "    out.write(b'PROGRESS %d 5\\n' % k); out.flush()\n"
              "out.write(b'a warning\\n'); out.flush()\n"
              "if sys.argv[1] == 'kill':\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "if sys.argv[1] == 'crash':  # no 'corediff: error:' line: the last line is the cause\n"
              "    out.write(b'Traceback (most recent call last):\\nRuntimeError: CUDA out of memory\\n')\n"
              "    sys.exit(1)\n"
              "out.write(b'corediff: error: the input is not CT\\n'); sys.exit(2)\n")
    for how, message in (("error", "the input is not CT"), ("kill", "stopped by signal 9"),
                         ("crash", "RuntimeError: CUDA out of memory")):
        seen = []
        job = module.CoreDiffProcess([sys.executable, "-c", script, how], onProgress=lambda d, t: seen.append(d))
        job.start()
        spin(slicer, lambda: job.finished, timeout=30)
        assert seen == [1, 2, 3, 4, 5], how
        assert message in job.errorMessage, (how, job.errorMessage)


def test_a_label_map_is_not_taken_or_accepted_as_the_ct(slicerEnv):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    labels = slicer.util.addVolumeFromArray(np.zeros((2, 32, 32), np.uint8), name="segmentation-label",
                                            nodeClassName="vtkMRMLLabelMapVolumeNode")
    ct, _ = makeVolume((2, 32, 32))
    widget = makeWidget(module)
    assert widget._parameterNode.inputVolume is ct  # not the label map added first
    widget._parameterNode.inputVolume = labels
    assert not widget.ui.applyButton.enabled
    assert "not a label map" in widget.ui.applyButton.toolTip


def test_time_left_counts_from_the_first_slice_not_from_loading(slicerEnv, monkeypatch):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    job = module.CoreDiffProcess(["true"])
    clock = [100.0]
    monkeypatch.setattr(module.time, "time", lambda: clock[0])
    job.startTime = 100.0
    clock[0] = 130.0  # 30 s of torch import, model load and dose check
    job._handleLine("PROGRESS 0 40")
    assert job.secondsLeft() is None
    clock[0] = 132.0
    job._handleLine("PROGRESS 2 40")  # 1 s per slice from here
    assert job.secondsLeft() == pytest.approx(38.0)


def test_the_roi_readout_takes_only_the_voxels_inside_a_tilted_roi(slicerEnv):  # noqa: F811
    """The readout took the voxels of the ROI's IJK bounding box: for an ROI at 30 degrees to the
    volume's axes that is 40 % more voxels than the ROI holds."""
    slicer, module, tempDir = slicerEnv
    rng = np.random.default_rng(0)
    array = rng.normal(0, 30, (3, 64, 64)).astype(np.int16)
    volume = slicer.util.addVolumeFromArray(array, name="flat")  # IJK = RAS, 1 mm voxels
    roi, inside = tiltedRoi(slicer)
    stats = module.CoreDiffSlicerLogic().roiStatistics(volume, volume, roi)
    assert stats["voxels"] == inside.sum()
    assert stats["before"]["mean"] == pytest.approx(array[1][inside].mean())
    assert stats["before"]["std"] == pytest.approx(array[1][inside].std())
    # the volume moved 5 mm by a (registration) transform, the ROI with it: the same voxels
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 5.0)
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    roi.SetCenter(36.0, 30.0, 1.0)
    moved = module.CoreDiffSlicerLogic().roiStatistics(volume, volume, roi)
    assert moved["voxels"] == stats["voxels"] and moved["before"]["mean"] == pytest.approx(stats["before"]["mean"])


def test_without_pytorch_the_lists_say_so_and_are_made_again_once_it_is_installed(slicerEnv, monkeypatch):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    widget = makeWidget(module)
    widget._onModelsListed(None, "ModuleNotFoundError: No module named 'torch'")
    assert widget.ui.statusLabel.property("text") == "PyTorch is not installed yet: Denoise offers to install it"
    refreshed = []
    monkeypatch.setattr(widget, "refreshModelsAndDevices", lambda: refreshed.append(True))

    def install(interactive=True):  # what the PyTorch extension and pip do, when the user agrees
        widget.logic._dependenciesOk = True
        return True
    monkeypatch.setattr(widget.logic, "checkDependencies", install)
    assert widget._dependenciesReady() and refreshed == [True]
    assert widget._dependenciesReady() and refreshed == [True]  # once
    widget._onModelsListed(None, "OSError: disk full")  # another failure: nothing to install
    assert widget._dependenciesReady() and refreshed == [True]
    # torch there (another extension's), safetensors not: the CLI cannot list either, and the lists
    # are made again once the module has installed it
    widget._onModelsListed(None, "ModuleNotFoundError: No module named 'safetensors'")
    assert widget.ui.statusLabel.property("text") == ("Python packages CoreDiff needs are not installed yet: "
                                                      "Denoise offers to install them")
    assert widget._dependenciesReady() and refreshed == [True, True]
    # `corediff models` lists without PyTorch (the shipped models and adaptations are files): the
    # devices list is the one that fails, and the lists are made again once PyTorch is installed
    widget._onModelsListed([{"name": "corediff-25", "kind": "model", "dose": 0.25}], None)
    widget._onDevicesListed(None, "ModuleNotFoundError: No module named 'torch'")
    assert widget.ui.statusLabel.property("text") == "PyTorch is not installed yet: Denoise offers to install it"
    assert widget.ui.modelComboBox.itemText(1) == "corediff-25 (25 % dose)"
    assert widget._dependenciesReady() and refreshed == [True, True, True]


def test_failing_run_shows_library_message(slicerEnv, tmp_path):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    widget = makeWidget(module)
    inputNode, _ = makeVolume((2, 32, 32))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"this is not a safetensors file")
    widget._parameterNode.modelFile = corrupt
    widget._parameterNode.device = "cpu"
    nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
    widget.ui.applyButton.click()
    spin(slicer, lambda: not widget._job.running, timeout=90)
    errors = [t for kind, t in H.displayed if kind == "error"]
    assert len(errors) == 1
    message = widget._job.errorMessage
    assert message and "Traceback" not in message
    assert message in errors[0] and message in widget.ui.statusLabel.property("text")
    assert slicer.mrmlScene.GetNumberOfNodes() == nodesBefore
    assert os.listdir(tempDir) == []


@pytest.mark.skipif(not cliHas("oneshot"), reason="`corediff oneshot` is not in the library yet")
def test_one_shot_wizard_produces_an_adaptation(slicerEnv, tinyModel, tmp_path, monkeypatch):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    monkeypatch.setenv("COREDIFF_HOME", str(tmp_path / "corediff-home"))  # inherited by the CLI
    widget = makeWidget(module)
    ldct, _ = makeVolume((4, 64, 64), name="LDCT10", seed=1, noiseSD=80)
    ndct, _ = makeVolume((4, 64, 64), name="NDCT", seed=2, noiseSD=5)
    p = widget._parameterNode
    p.modelFile = __import__("pathlib").Path(tinyModel)
    ui = widget.ui
    assert ui.oneShotStack.property("currentIndex") == 0
    ui.oneShotLdctSelector.setCurrentNode(ldct)
    ui.oneShotNextButton.click()
    assert ui.oneShotStack.property("currentIndex") == 1
    ui.oneShotSliceSlider.setProperty("value", 2)  # moves the Red view ...
    assert widget.logic.redSliceIndex(ldct) == 2
    widget.logic.setRedSliceIndex(ldct, 1)  # ... and follows it
    assert p.osSlice == 1
    ui.oneShotNextButton.click()
    ui.oneShotNdctSelector.setCurrentNode(ndct)
    ui.oneShotNextButton.click()
    assert ui.oneShotStack.property("currentIndex") == 3
    ui.oneShotNameLineEdit.setProperty("text", "test_dose10")
    ui.oneShotAdaptButton.click()
    spin(slicer, lambda: not widget._oneShotJob.running, timeout=110)
    assert widget._oneShotJob.succeeded, widget._oneShotJob.errorMessage
    name, path = widget._lastAdaptation
    assert name == "test_dose10" and os.path.isfile(path)
    assert ui.oneShotStack.property("currentIndex") == 4
    assert str(tmp_path / "corediff-home") in path
    # it now appears in the model list (refreshed from `corediff models --json`) ...
    waitIdle(slicer, widget, timeout=90)
    combo = ui.modelComboBox
    assert combo.itemData(0) == ""  # library default first
    assert "adaptation:test_dose10" in [combo.itemData(i) for i in range(combo.property("count"))]
    devices = [ui.deviceComboBox.itemData(i) for i in range(ui.deviceComboBox.property("count"))]
    assert devices[0] == "auto" and "cpu" in devices  # from `corediff devices --json`
    assert ui.refreshModelsButton.property("enabled")
    # ... and one click applies it to the whole volume: into a new volume, not the output selected
    # for Denoise, and with all of its model's steps whatever steps were chosen there
    earlier, _ = makeVolume((4, 64, 64), name="an earlier result", seed=3)
    earlierArray = matrixOf(earlier).copy()
    p.outputVolume = earlier
    p.autoSteps, p.steps = False, 1
    ui.oneShotApplyButton.click()
    args = [str(a) for a in H.launched[-1].args]
    assert args[3] == "denoise" and "--adaptation" in args and "test_dose10" in args
    assert ["--model", tinyModel] == args[args.index("--model"):args.index("--model") + 2]
    assert "--steps" not in args  # an adaptation weighs all of its model's steps
    spin(slicer, lambda: not widget._job.running, timeout=90)
    assert widget._job.succeeded, widget._job.errorMessage
    out = slicer.mrmlScene.GetFirstNodeByName("LDCT10 denoised")
    assert out is not None and out.GetID() != earlier.GetID() and p.outputVolume.GetID() == out.GetID()
    np.testing.assert_array_equal(matrixOf(out), matrixOf(ldct))
    np.testing.assert_array_equal(matrixOf(earlier), earlierArray)
    assert os.listdir(tempDir) == []
    # another reference slice under the same name: asked before the saved one is replaced
    waitIdle(slicer, widget, timeout=90)
    ui.oneShotBackButton.click()
    assert ui.oneShotStack.property("currentIndex") == 3
    started = len(H.launched)
    ui.oneShotAdaptButton.click()  # declined (the harness answers Cancel)
    assert H.displayed[-1][0] == "confirm" and "'test_dose10' already exists" in H.displayed[-1][1]
    assert len(H.launched) == started and "choose another name" in ui.oneShotStatusLabel.property("text")
    H.confirmAnswer["value"] = True
    ui.oneShotAdaptButton.click()
    assert "--overwrite" in H.launched[-1].args
    spin(slicer, lambda: not widget._oneShotJob.running, timeout=110)
    assert widget._oneShotJob.succeeded, widget._oneShotJob.errorMessage


def test_the_shipped_in_slicer_self_test_passes_here(slicerEnv):  # noqa: F811
    """CoreDiffSlicerTest is what `ctest -R py_CoreDiffSlicer` and Reload & Test run in Slicer;
    here it runs on the harness with the shipped default model (denoise, geometry, provenance
    attributes, noise down, cancel)."""
    slicer, module, tempDir = slicerEnv
    module.CoreDiffSlicerTest().runTest()
    assert os.listdir(tempDir) == []  # nothing left behind by either run


def test_the_self_test_says_it_skips_denoising_where_pytorch_is_missing(slicerEnv, monkeypatch):  # noqa: F811
    """Slicer's extension test machines have no PyTorch: the self-test failed there on an
    assertion about the dependencies instead of saying what it could not test."""
    slicer, module, tempDir = slicerEnv
    monkeypatch.setattr(module.CoreDiffSlicerLogic, "checkDependencies", lambda self, interactive=True: False)
    monkeypatch.setattr(module.CoreDiffSlicerLogic, "denoise",
                        lambda *a, **k: pytest.fail("denoised without its dependencies"))
    shown = []
    monkeypatch.setattr(module.CoreDiffSlicerTest, "delayDisplay", lambda self, text, *a: shown.append(text))
    module.CoreDiffSlicerTest().runTest()
    assert any("denoising tests are skipped" in text for text in shown)
    assert "Checking the module's geometry, arguments and messages" in shown  # what needs no PyTorch ran
    assert shown[shown.index("Checking the module's geometry, arguments and messages") + 1] == "Test passed"
    # ctest (slicer.testing.runUnitTest) loads the test_ methods and runs each on its own, not runTest:
    # the denoising ones failed there (RuntimeError, no torch) instead of being skipped
    import unittest
    monkeypatch.setattr(module.CoreDiffSlicerLogic, "startDenoise",
                        lambda *a, **k: pytest.fail("started denoising without its dependencies"))
    suite = unittest.TestLoader().loadTestsFromTestCase(module.CoreDiffSlicerTest)
    assert suite.countTestCases() == 5
    result = unittest.TestResult()
    suite.run(result)
    assert (result.testsRun, result.failures, result.errors) == (5, [], [])
    assert len(result.skipped) == 4 and all("PyTorch" in why for _, why in result.skipped)


def test_without_its_library_the_module_shows_a_dialog_only_when_asked_interactively(slicerEnv, monkeypatch):  # noqa: F811,E501
    """ctest asks non-interactively: a dialog there waits for no one to close it."""
    slicer, module, tempDir = slicerEnv
    monkeypatch.setattr(module, "coreDiffLibParentDir", lambda: None)
    logic = module.CoreDiffSlicerLogic()
    shown = len(H.displayed)
    assert logic.checkDependencies(interactive=False) is False and len(H.displayed) == shown
    monkeypatch.setattr(module.CoreDiffSlicerLogic, "_speedupsOffered", True)  # no optional-package question
    assert logic.checkDependencies(interactive=True) is False
    assert "CoreDiffLib package was not found" in H.displayed[-1][1]


def test_a_failed_package_install_is_a_message_not_a_traceback(slicerEnv, monkeypatch):  # noqa: F811
    """Offline hospital machines: slicer.util.pip_install raises CalledProcessError when pip fails."""
    slicer, module, tempDir = slicerEnv
    logic = module.CoreDiffSlicerLogic()
    monkeypatch.setattr(logic, "REQUIRED_PACKAGES", {"no_such_module_for_corediff": "no-such-package"})
    monkeypatch.setitem(H.confirmAnswer, "value", True)

    def failingInstall(requirements):
        raise subprocess.CalledProcessError(1, ["pip", "install", requirements])
    monkeypatch.setattr(slicer.util, "pip_install", failingInstall)
    assert logic.checkDependencies(interactive=True) is False
    errors = [text for kind, text in H.displayed if kind == "error"]
    assert len(errors) == 1 and errors[0].startswith("Installing no-such-package failed")


def test_a_package_older_than_the_library_needs_is_offered_as_an_upgrade(slicerEnv, monkeypatch):  # noqa: F811
    """Present was enough: an old scikit-image left in Slicer's Python by another extension would
    fail in the middle of a run."""
    slicer, module, tempDir = slicerEnv
    logic = module.CoreDiffSlicerLogic()
    monkeypatch.setattr(logic, "REQUIRED_PACKAGES", {"numpy": "numpy>=1.0"})
    assert logic.checkDependencies(interactive=True) and not [m for m in H.displayed if m[0] == "confirm"]
    logic = module.CoreDiffSlicerLogic()
    monkeypatch.setattr(logic, "REQUIRED_PACKAGES", {"numpy": "numpy>=999.1"})
    assert logic.checkDependencies(interactive=False) is False
    assert logic.checkDependencies(interactive=True) is False  # the user says no
    assert [text for kind, text in H.displayed if kind == "confirm"][-1].startswith(
        "CoreDiff needs these Python packages: numpy>=999.1")
    assert module.requirementMet("numpy") and not module.requirementMet("no-such-distribution>=1")


def test_the_faster_cpu_runtime_is_offered_with_the_required_packages_and_may_fail(slicerEnv, monkeypatch):  # noqa: F811
    """ONNX Runtime doubles the CPU speed, and neither the Slicer install nor the module installed
    it; its install failing must not stop the module, which then runs on PyTorch."""
    slicer, module, tempDir = slicerEnv
    logic = module.CoreDiffSlicerLogic()
    monkeypatch.setattr(logic, "REQUIRED_PACKAGES", {"no_such_module_for_corediff": "needed-package"})
    monkeypatch.setattr(logic, "SPEEDUP_PACKAGES", {"no_such_speedup_for_corediff": "speedup-package"})
    monkeypatch.setitem(H.confirmAnswer, "value", True)
    installed = []

    def install(requirements):
        installed.append(requirements)
        if requirements == "speedup-package":
            raise subprocess.CalledProcessError(1, ["pip", "install", requirements])
    monkeypatch.setattr(slicer.util, "pip_install", install)
    monkeypatch.setattr(module, "coreDiffLibParentDir", lambda: tempDir)
    assert logic.checkDependencies(interactive=True) is True
    assert installed == ["needed-package", "speedup-package"]
    confirm = [text for kind, text in H.displayed if kind == "confirm"][-1]
    assert "needed-package" in confirm and "speedup-package (optional: 1.2-1.3 times the speed on a CPU)" in confirm
    assert not [m for m in H.displayed if m[0] == "error"]


def test_the_faster_cpu_runtime_is_offered_alone_once_a_session(slicerEnv, monkeypatch):  # noqa: F811
    """The required packages already there (another extension's), ONNX Runtime was never offered:
    it is, once a session; declined, the module runs on PyTorch without asking again."""
    slicer, module, tempDir = slicerEnv
    monkeypatch.setattr(module.CoreDiffSlicerLogic, "REQUIRED_PACKAGES", {"numpy": "numpy>=1.0"})
    monkeypatch.setattr(module.CoreDiffSlicerLogic, "SPEEDUP_PACKAGES", {"no_such_speedup_for_corediff": "speedup"})
    monkeypatch.setattr(module.CoreDiffSlicerLogic, "_speedupsOffered", False)
    monkeypatch.setattr(module, "coreDiffLibParentDir", lambda: tempDir)
    installed = []
    monkeypatch.setattr(slicer.util, "pip_install", installed.append)
    assert module.CoreDiffSlicerLogic().checkDependencies(interactive=False) is True  # a test run: no dialog
    assert not [m for m in H.displayed if m[0] == "confirm"]
    monkeypatch.setitem(H.confirmAnswer, "value", False)
    assert module.CoreDiffSlicerLogic().checkDependencies(interactive=True) is True  # declined: still ready
    assert [text for kind, text in H.displayed if kind == "confirm"] == [
        "Install speedup (optional: 1.2-1.3 times the speed on a CPU)? Without them CoreDiff runs on PyTorch."]
    assert module.CoreDiffSlicerLogic().checkDependencies(interactive=True) is True
    assert len([m for m in H.displayed if m[0] == "confirm"]) == 1 and installed == []  # not asked again
    monkeypatch.setattr(module.CoreDiffSlicerLogic, "_speedupsOffered", False)  # the next session, accepted
    monkeypatch.setitem(H.confirmAnswer, "value", True)
    assert module.CoreDiffSlicerLogic().checkDependencies(interactive=True) is True and installed == ["speedup"]


def test_an_older_pytorch_in_slicer_is_refused_with_how_to_update(slicerEnv, monkeypatch):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    monkeypatch.setattr(module.CoreDiffSlicerLogic, "TORCH_REQUIREMENT", ">=999.1")
    logic = module.CoreDiffSlicerLogic()
    assert logic.checkDependencies(interactive=False) is False and not H.displayed
    assert logic.checkDependencies(interactive=True) is False
    error = [text for kind, text in H.displayed if kind == "error"][-1]
    assert error.startswith("CoreDiff needs PyTorch >=999.1; Slicer's Python has torch ") and "restart Slicer" in error


def test_a_second_scan_gets_its_own_result_and_readouts_refuse_volumes_of_another_grid(slicerEnv, tinyModel):  # noqa: F811
    """After a run the output selector names the result (a second run of the same scan replaces
    it); choosing another scan as input must not aim the next run at the first scan's result.
    Readouts pair voxels by index, so a volume of another grid, a one-slice preview or a copy
    under another transform is refused with what to do, not scored."""
    slicer, module, tempDir = slicerEnv
    widget, p = widgetOnTinyModel(module, tinyModel)
    a, _ = makeVolume((4, 48, 48), name="PatientA", seed=0)
    b, _ = makeVolume((6, 40, 40), name="PatientB", seed=5)
    p.inputVolume = a
    widget.ui.applyButton.click()
    spin(slicer, lambda: not widget._job.running, timeout=120)
    resultA = slicer.mrmlScene.GetFirstNodeByName("PatientA denoised")
    assert resultA is not None and p.outputVolume is resultA
    kept = slicer.util.arrayFromVolume(resultA).copy()
    widget.ui.inputSelector.setCurrentNode(b)
    assert p.outputVolume is None  # "Create new volume" again
    p.inputVolume = a  # back to A: its own result may be chosen and replaced, as before
    p.outputVolume = resultA
    p.inputVolume = b
    assert p.outputVolume is None
    widget.ui.applyButton.click()
    spin(slicer, lambda: not widget._job.running, timeout=120)
    assert widget._job.succeeded, widget._job.errorMessage
    resultB = slicer.mrmlScene.GetFirstNodeByName("PatientB denoised")
    assert resultB is not None and resultB is not resultA and p.outputVolume is resultB
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(resultA), kept)
    assert resultA.GetNodeReference("CoreDiffInput") is a and resultB.GetNodeReference("CoreDiffInput") is b

    # readouts of mismatched pairs: refused with what to do, the label replaced
    p.inputVolume, p.outputVolume = b, resultA
    widget.ui.measureButton.click()
    text = widget.ui.roiResultsLabel.property("text")
    assert "'PatientA denoised' (48x48x4) is not on the voxel grid of 'PatientB' (40x40x6)" in text, text
    assert "select this scan's denoised volume" in text
    p.referenceVolume = a
    widget.ui.qualityButton.click()
    assert "is not on the voxel grid of 'PatientB'" in widget.ui.qualityResultsLabel.property("text")
    preview = widget.logic.denoise(a, modelFile=tinyModel, device="cpu", timeout=90, sliceIndex=2)
    p.inputVolume, p.outputVolume = a, preview
    widget.ui.measureButton.click()
    assert "(48x48x1) is not on the voxel grid" in widget.ui.roiResultsLabel.property("text")
    p.outputVolume = resultA
    moved = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 20.0)
    moved.SetMatrixTransformToParent(shift)
    reference = H.volumeFromArray(slicer.util.arrayFromVolume(a).copy(), ijkToRASOf(a), "NDCT")
    reference.SetAndObserveTransformNodeID(moved.GetID())
    p.referenceVolume = reference
    widget.ui.qualityButton.click()
    assert "are under different transforms" in widget.ui.qualityResultsLabel.property("text")
    reference.SetAndObserveTransformNodeID(None)
    widget.ui.qualityButton.click()
    assert widget.ui.qualityResultsLabel.property("text").startswith("Slice"), \
        widget.ui.qualityResultsLabel.property("text")
    assert [m for m in H.displayed if m[0] == "error"] == []


def test_a_run_ending_in_another_module_leaves_its_views_until_the_user_comes_back(slicerEnv, tinyModel):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    widget, p = widgetOnTinyModel(module, tinyModel)
    ct, _ = makeVolume((4, 48, 48), name="CT")
    other, _ = makeVolume((4, 48, 48), name="Other", seed=3)
    p.inputVolume = ct
    layoutManager = slicer.app.layoutManager()
    layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
    widget.ui.applyButton.click()
    widget.parent.isEntered = False  # the user opens another module (Slicer clears it, then calls exit)
    widget.exit()
    red = layoutManager.sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
    red.SetBackgroundVolumeID(other.GetID())
    spin(slicer, lambda: not widget._job.running, timeout=120)
    assert widget._job.succeeded, widget._job.errorMessage
    assert layoutManager.layout == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView
    assert red.GetBackgroundVolumeID() == other.GetID()
    widget.parent.isEntered = True
    widget.enter()
    assert layoutManager.layout == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    assert red.GetBackgroundVolumeID() == ct.GetID()
    yellow = layoutManager.sliceWidget("Yellow").sliceLogic().GetSliceCompositeNode()
    assert yellow.GetBackgroundVolumeID() == slicer.mrmlScene.GetFirstNodeByName("CT denoised").GetID()


def test_the_views_follow_the_planes_of_a_tilted_scan(slicerEnv):  # noqa: F811
    """A gantry-tilted scan is denoised plane by plane along its own slices: the comparison shows
    those planes (Slicer's Rotate to volume plane), not world-axial cuts across them; a scan
    rotated only within its planes keeps the axial views."""
    slicer, module, tempDir = slicerEnv
    logic = module.CoreDiffSlicerLogic()
    flat, _ = makeVolume((4, 48, 48), name="Flat")  # rotated in-plane only
    assert not logic.axialPlanesTilted(flat)
    tilt = np.radians(20)
    m = vtk.vtkMatrix4x4()
    rows = [[0.7, 0, 0, -30], [0, 0.7 * np.cos(tilt), -5 * np.sin(tilt), 10],
            [0, 0.7 * np.sin(tilt), 5 * np.cos(tilt), -50]]
    for r in range(3):
        for c in range(4):
            m.SetElement(r, c, rows[r][c])
    tilted = H.volumeFromArray(np.zeros((6, 48, 48), np.int16), m, "Tilted head")
    copy = H.volumeFromArray(np.zeros((6, 48, 48), np.int16), m, "Tilted head denoised")
    assert logic.axialPlanesTilted(tilted)
    logic.showComparison(tilted, copy)
    layoutManager = slicer.app.layoutManager()
    for view in ("Red", "Yellow"):
        sliceToRAS = layoutManager.sliceWidget(view).mrmlSliceNode().GetSliceToRAS()
        normal = [sliceToRAS.GetElement(r, 2) for r in range(3)]
        assert normal == pytest.approx([0, -np.sin(tilt), np.cos(tilt)], abs=1e-6)
    logic.showComparison(flat, flat)
    assert layoutManager.sliceWidget("Red").mrmlSliceNode().GetOrientation() == "Axial"


def test_unpaired_one_shot_leaves_the_normal_dose_slice_to_the_library_unless_chosen(slicerEnv, tinyModel, tmp_path, monkeypatch):  # noqa: F811,E501
    slicer, module, tempDir = slicerEnv
    monkeypatch.setenv("COREDIFF_HOME", str(tmp_path / "corediff-home"))
    widget = makeWidget(module)
    ldct, _ = makeVolume((4, 48, 48), name="LDCT10", seed=1, noiseSD=80)
    ndct, _ = makeVolume((12, 48, 48), name="Other NDCT", seed=2, noiseSD=5)
    p = widget._parameterNode
    p.modelFile = __import__("pathlib").Path(tinyModel)
    p.osLdctVolume, p.osNdctVolume, p.osPaired, p.osSlice = ldct, ndct, False, 2
    spinBox = widget.ui.oneShotNdctSliceSpinBox
    assert spinBox.property("maximum") == 11 and p.osNdctSlice == -1
    assert spinBox.property("text") == "automatic"
    for chosen in (-1, 0, 5):  # 0, the first slice, is a choice too (not 'automatic')
        p.osNdctSlice = chosen
        widget.onOneShotAdapt()
        args = [str(a) for a in H.launched[-1].args]
        assert ("--ndct-slice" in args) == (chosen >= 0)
        if chosen >= 0:
            assert args[args.index("--ndct-slice") + 1] == str(chosen)
        widget.onOneShotAdapt()  # Cancel
        spin(slicer, lambda: not widget._oneShotJob.running, timeout=30)
    # a message about the module's temporary files names the volumes instead
    logic = widget.logic
    text = logic.guiMessage("/tmp/x/CoreDiff-1/ldct.nrrd contains 1 NaN/inf voxels; --device cuda was asked for",
                            {"/tmp/x/CoreDiff-1/ldct.nrrd": "LDCT10"})
    assert text == "'LDCT10' contains 1 NaN/inf voxels; Device 'cuda' was asked for"


def test_listings_read_their_json_past_warnings_that_hold_brackets(slicerEnv):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    parse = module.CoreDiffSlicerLogic.parseJsonOutput
    text = ('/x/torch/__init__.py:1: UserWarning: CUDA [12.1] not found {fallback}\n'
            '[\n {"name": "corediff-25", "kind": "model"}\n]\nwarning after\n')
    assert parse(text) == [{"name": "corediff-25", "kind": "model"}]
    with pytest.raises(ValueError, match="unexpected output"):
        parse("Traceback (most recent call last):\n  [nothing]\n")


def test_the_wizard_takes_a_one_slice_normal_dose_reference_where_it_lies(slicerEnv, tinyModel, tmp_path, monkeypatch):  # noqa: F811,E501
    """The library finds a paired reference given as its one slice; the wizard refused it as not
    on the low-dose grid. The reference slice becomes the one it lies at. A name held by a newer
    CoreDiff's file is not offered for replacement."""
    slicer, module, tempDir = slicerEnv
    monkeypatch.setenv("COREDIFF_HOME", str(tmp_path / "home"))
    widget = makeWidget(module)
    ldct, m = makeVolume((6, 48, 48), name="LDCT10", seed=1, noiseSD=80)
    one = vtk.vtkMatrix4x4()
    one.DeepCopy(m)
    origin = m.MultiplyPoint([0, 0, 4, 1])
    for r in range(3):
        one.SetElement(r, 3, origin[r] + 0.2)  # rounded by an export
    ndct = H.volumeFromArray(slicer.util.arrayFromVolume(ldct)[4:5].copy(), one, "NDCT slice 4")
    p = widget._parameterNode
    p.modelFile = __import__("pathlib").Path(tinyModel)
    p.osLdctVolume, p.osNdctVolume, p.osPaired, p.osSlice, p.osName = ldct, ndct, True, 1, "one_slice"
    assert widget.logic.oneSliceOf(ldct, ndct) == 4
    assert widget._oneShotStepValid(2) is None
    widget.onOneShotAdapt()
    args = [str(a) for a in H.launched[-1].args]
    assert args[args.index("--slice") + 1] == "4" and p.osSlice == 4
    widget.onOneShotAdapt()  # Cancel
    spin(slicer, lambda: not widget._oneShotJob.running, timeout=30)
    elsewhere = H.volumeFromArray(np.zeros((1, 48, 48), np.int16), m, "NDCT elsewhere")
    p.osNdctVolume = elsewhere
    assert widget.logic.oneSliceOf(ldct, elsewhere) == 0  # slice 0's own place: found
    shifted = vtk.vtkMatrix4x4()
    shifted.DeepCopy(one)
    shifted.SetElement(2, 3, one.GetElement(2, 3) + 1.2)  # between slices (2.5 mm apart)
    p.osNdctVolume = H.volumeFromArray(np.zeros((1, 48, 48), np.int16), shifted, "NDCT off")
    assert "paired volumes must be aligned" in widget._oneShotStepValid(2)
    widget._adaptationNames = {"future": "newer"}
    p.osNdctVolume, p.osName = ndct, "future"
    started = len(H.launched)
    widget.onOneShotAdapt()
    assert len(H.launched) == started and "made by a newer CoreDiff" in widget.ui.oneShotStatusLabel.property("text")
    assert not [d for d in H.displayed if d[0] == "confirm"]


def test_a_result_from_an_older_scene_is_not_given_another_scans_voxels(slicerEnv):  # noqa: F811
    slicer, module, tempDir = slicerEnv
    widget = makeWidget(module)
    a, m = makeVolume((4, 48, 48), name="PatientA")
    b, _ = makeVolume((6, 40, 40), name="PatientB", seed=5)
    old = H.volumeFromArray(slicer.util.arrayFromVolume(a).copy(), m, "PatientA denoised")
    old.SetAttribute("CoreDiff.model", "corediff-25")  # made before results referenced their scan
    p = widget._parameterNode
    p.inputVolume, p.outputVolume = a, old
    assert p.outputVolume is old  # its own scan's grid: kept
    p.inputVolume = b
    assert p.outputVolume is None


def test_a_saved_choice_missing_here_is_kept_and_named_not_shown_as_a_raw_key(slicerEnv):  # noqa: F811
    """A scene saved on another computer chose an adaptation and a GPU this one lacks: the lists
    showed 'adaptation:liver-10' and 'cuda:1', keys no one had typed, as if they were offered."""
    slicer, module, tempDir = slicerEnv
    widget = makeWidget(module)
    ui, p = widget.ui, widget._parameterNode
    p.model, p.device = "adaptation:liver-10", "cuda:1"
    widget._onModelsListed([{"name": "corediff-25", "kind": "model", "dose": 0.25}], None)
    widget._onDevicesListed([{"name": "cpu"}], None)
    assert ui.modelComboBox.currentText == "One-shot: liver-10 (not found here)"
    assert ui.deviceComboBox.currentText == "cuda:1 (not found here)"
    assert (p.model, p.device) == ("adaptation:liver-10", "cuda:1")  # kept: the choice is the user's to change
    p.model = "model:corediff-5-w64"  # set before the list has it (it is still loading): named, not keyed
    assert ui.modelComboBox.currentText == "corediff-5-w64"


def test_what_the_radiologist_sees_warnings_kept_words_not_flags_and_the_wizard_on_its_scan(slicerEnv, tinyModel):  # noqa: F811,E501
    """From a review in the user's seat: a doubt on Automatic's model flashed by and was gone at
    Done, and named a command-line flag; the status line showed temporary paths; the wizard ignored
    the Device and followed a Red view that showed another scan; steps up to 50 (every model has
    T = 10); '(default)' in the lists while they load; an SD that went up 'reduced by -20 %'."""
    slicer, module, tempDir = slicerEnv
    widget = makeWidget(module)
    ui, p = widget.ui, widget._parameterNode
    assert ui.modelComboBox.itemText(0) == "Automatic: the model for the scan's dose"  # before the lists load
    assert ui.deviceComboBox.itemText(0) == "Auto (fastest available)"
    assert ui.stepsSliderWidget.property("maximum") == 10
    widget._onModelsListed([{"name": "corediff-25", "kind": "model", "dose": 0.25},  # an adaptation's dose is
                            {"name": "mine", "kind": "adaptation", "dose": "10%"}], None)  # as its maker typed it
    assert [ui.modelComboBox.itemText(i) for i in range(1, 3)] == ["corediff-25 (25 % dose)", "One-shot: mine (10%)"]
    assert "*.pt" not in " ".join(ui.modelPathLineEdit.nameFilters)
    widget._runWarnings = []
    widget._onInfo("model for this scan: corediff-25-w32 (...; the Model list overrides it)")
    widget._onInfo("warning: the body reaches the edge of the image in 6 of 6 slices measured, so its size and "
                   "the dose are underestimated: if the model looks too strong, choose one in the Model list")
    widget._onInfo("wrote the result (2.8 s, 0.7 s/slice)")
    assert widget._runWarnings == ["the body reaches the edge of the image in 6 of 6 slices measured, so its size "
                                   "and the dose are underestimated: if the model looks too strong, choose one in "
                                   "the Model list"]
    # the CLI's lines in the module's words, with its temporary files named by what they hold
    files = {"/tmp/run/input.nrrd": "Cropped FOV", "/tmp/run/output.nrrd": "the result"}
    for line, shown in (("choose one with --model", "choose one in the Model list"),
                        ("--model NAME overrides", "the Model list overrides it"),
                        ("wrote /tmp/run/output.nrrd (2.8 s)", "wrote 'the result' (2.8 s)"),
                        ("/tmp/run/input.nrrd: 6 slices", "'Cropped FOV': 6 slices"),
                        ("--slice 0 of 'LD': no body found", "reference slice 0 of 'LD': no body found"),
                        # the library's own words (a review saw "use Device 'cpu,'" and 'corediff oneshot')
                        ("--device cuda was asked for but no CUDA GPU is visible to PyTorch: use --device cpu, or "
                         "install a CUDA build of torch", "Device 'cuda' was asked for but no CUDA GPU is visible to "
                         "PyTorch: use Device 'cpu', or install a CUDA build of torch"),
                        ("--device cuda:1: this machine's GPUs are", "Device 'cuda:1': this machine's GPUs are"),
                        ("not this one (tiny, sha256 ab…): use it with its own model, or run 'corediff oneshot' for "
                         "this model", "not this one (tiny, sha256 ab…): use it with its own model, or adapt again "
                         "in the One-shot adaptation section"),
                        ("no adaptation 'x' in /h (known: none); run 'corediff oneshot' first",
                         "no adaptation 'x' in /h (known: none); make one in the One-shot adaptation section"),
                        ("not installed here or has changed since the fit: give that model with --model, or run "
                         "'corediff oneshot' again", "not installed here or has changed since the fit: choose that "
                         "model in the Model list, or adapt again in the One-shot adaptation section")):
        assert module.CoreDiffSlicerLogic.guiMessage(line, files) == shown, line
    # the status line at Done keeps the warning; an adaptation is named and its steps are not offered
    inputNode, _ = makeVolume((4, 48, 48), name="Cropped FOV")
    result, _ = makeVolume((4, 48, 48), name="Cropped FOV denoised")
    for key, value in (("CoreDiff.model", "corediff-25-w32"), ("CoreDiff.steps", "10 of 10"),
                       ("CoreDiff.adaptation", "scanner_10pct")):
        result.SetAttribute(key, value)
    job = type("Job", (), {"cancelled": False, "startTime": __import__("time").time(), "sliceIndex": None,
                           "inputNode": inputNode})()
    widget._showDenoiseResult(job, result, None)
    status = ui.statusLabel.property("text")
    assert "(corediff-25-w32, 10 of 10 steps, one-shot adaptation scanner_10pct)" in status
    assert "\nNote: the body reaches the edge of the image" in status
    p.model = "adaptation:scanner_10pct"
    assert not ui.autoStepsCheckBox.enabled and not ui.stepsSliderWidget.enabled
    assert "runs all of its model's steps" in ui.autoStepsCheckBox.toolTip
    p.model = ""
    assert ui.autoStepsCheckBox.enabled
    assert "reduced by" not in module.formatRoiStatistics(
        {"voxels": 9, "where": "here", "before": {"mean": 0.0, "std": 10.0}, "after": {"mean": 0.0, "std": 12.0}})
    # the wizard's slice step shows its scan in Red, at its middle; the adaptation runs on the chosen device
    other, _ = makeVolume((4, 48, 48), name="Other", seed=3)
    widget.logic._compositeNode("Red").SetBackgroundVolumeID(other.GetID())
    ldct, _ = makeVolume((7, 48, 48), name="LD", seed=2, noiseSD=80)
    ndct, _ = makeVolume((7, 48, 48), name="ND", seed=2, noiseSD=20)
    p.osLdctVolume, p.osNdctVolume, p.osSlice, p.osName = ldct, ndct, 0, "wizard_device"
    widget._setOneShotStep(1)
    assert widget.logic._compositeNode("Red").GetBackgroundVolumeID() == ldct.GetID()
    assert widget.logic.redSliceIndex(ldct) == 3 and p.osSlice == 3
    p.device, p.modelFile = "cpu", __import__("pathlib").Path(tinyModel)
    widget.onOneShotAdapt()
    args = [str(a) for a in H.launched[-1].args]
    assert args[args.index("--device") + 1] == "cpu"
    widget.onOneShotAdapt()  # Cancel
    spin(slicer, lambda: not widget._oneShotJob.running, timeout=30)


def test_what_the_widget_sends_and_where_a_result_lands_when_the_input_changes_mid_run(slicerEnv, tinyModel):  # noqa: F811,E501
    """From a mutation review: a model chosen in the list beside a model file of one's own, the
    device, batch size and automatic steps each reached the command line unchecked; the volume
    handed to the CLI could have its spacing in another order (the library picks the context and
    the dose model from it); and an input changed during a run could aim the next run at the
    first patient's result."""
    slicer, module, tempDir = slicerEnv
    widget, p = widgetOnTinyModel(module, tinyModel)
    a, _ = makeVolume((4, 48, 48), name="PatientA", seed=0)
    b, _ = makeVolume((6, 40, 40), name="PatientB", seed=5)
    p.inputVolume = a
    p.model = "model:corediff-25-w32"  # the list's choice; the model file wins
    p.batchSize = 3
    p.autoSteps = True
    widget.ui.applyButton.click()
    args = [str(x) for x in H.launched[-1].args]
    assert args.count("--model") == 1 and args[args.index("--model") + 1] == tinyModel
    assert args[args.index("--device") + 1] == "cpu" and args[args.index("--batch-size") + 1] == "3"
    assert "--steps" not in args  # automatic: the library's --steps auto
    p.inputVolume = b  # while A runs
    spin(slicer, lambda: not widget._job.running, timeout=120)
    assert widget._job.succeeded, widget._job.errorMessage
    resultA = slicer.mrmlScene.GetFirstNodeByName("PatientA denoised")
    assert resultA is not None and p.inputVolume is b and p.outputVolume is None  # B gets its own result
    # the volume written for the CLI: the node's spacing, in (x, y, z) order, and its LPS geometry
    import SimpleITK as sitk
    path = os.path.join(tempDir, "written.nrrd")
    widget.logic.writeVolume(a, path)
    image = sitk.ReadImage(path)
    assert image.GetSpacing() == pytest.approx(a.GetSpacing())
    ras = [0.0, 0.0, 0.0, 1.0]
    ijkToRASOf(a).MultiplyPoint([3, 5, 2, 1], ras)
    assert image.TransformIndexToPhysicalPoint((3, 5, 2)) == pytest.approx((-ras[0], -ras[1], ras[2]))


def test_readouts_take_the_output_inside_the_roi_too_and_a_reference_half_a_millimetre_off_is_refused(slicerEnv):  # noqa: F811,E501
    slicer, module, tempDir = slicerEnv
    rng = np.random.default_rng(0)
    before = rng.normal(0, 30, (3, 64, 64)).astype(np.int16)
    after = (before // 3).astype(np.int16)
    volume = slicer.util.addVolumeFromArray(before, name="flat")
    denoised = slicer.util.addVolumeFromArray(after, name="flat denoised")
    roi, inside = tiltedRoi(slicer)
    logic = module.CoreDiffSlicerLogic()
    stats = logic.roiStatistics(volume, denoised, roi)
    assert stats["after"]["mean"] == pytest.approx(after[1][inside].mean())
    assert stats["after"]["std"] == pytest.approx(after[1][inside].std())
    shifted = slicer.util.addVolumeFromArray(before, name="half a millimetre off")
    shifted.SetOrigin(0.5, 0.0, 0.0)
    assert "is not on the voxel grid" in (logic.gridMismatch(shifted, volume) or "")


def test_a_run_that_cannot_start_leaves_no_copy_of_the_scan_and_a_new_run_forgets_old_doubts(slicerEnv, tinyModel, monkeypatch):  # noqa: F811,E501
    """A denoise or one-shot run whose process cannot start (no PythonSlicer, no permission) left
    its NRRD copies of the scans in Slicer's temporary folder (one-shot) and was kept as running;
    and a run's 'Done' must not repeat the doubts of the run before it."""
    slicer, module, tempDir = slicerEnv
    widget, p = widgetOnTinyModel(module, tinyModel)
    inputNode, _ = makeVolume((4, 48, 48), name="LD")
    ndct, _ = makeVolume((4, 48, 48), name="ND", seed=4, noiseSD=10)
    p.inputVolume = inputNode
    p.osLdctVolume, p.osNdctVolume, p.osSlice, p.osName = inputNode, ndct, 1, "cannot_start"
    nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
    launch = slicer.util.launchConsoleProcess

    def cannotStart(*args, **kwargs):
        raise OSError("[Errno 2] No such file or directory: 'PythonSlicer'")

    monkeypatch.setattr(slicer.util, "launchConsoleProcess", cannotStart)
    widget.ui.applyButton.click()
    assert widget._job is None and widget.logic._jobs == []
    assert widget.ui.statusLabel.property("text").startswith("Failed to start: ")
    assert widget.ui.applyButton.property("text") == "Denoise" and widget.ui.applyButton.property("enabled")
    widget.onOneShotAdapt()
    assert widget.ui.oneShotStatusLabel.property("text").startswith("Failed to start: ")
    assert widget.logic._jobs == [] and widget.ui.oneShotAdaptButton.property("text") == "Adapt"
    assert os.listdir(tempDir) == []  # neither run's copies of the scans stay behind
    assert [kind for kind, _ in H.displayed] == ["error", "error"]
    p.inputVolume = ndct  # another scan selected: the failure was about the one before
    assert widget.ui.statusLabel.property("text") == ""
    assert slicer.mrmlScene.GetNumberOfNodes() == nodesBefore
    monkeypatch.setattr(slicer.util, "launchConsoleProcess", launch)
    widget._runWarnings = ["a doubt about the last run's model"]
    widget.ui.applyButton.click()
    spin(slicer, lambda: not widget._job.running, timeout=90)
    status = widget.ui.statusLabel.property("text")
    assert status.startswith("Done") and "a doubt about the last run's model" not in status, status


def test_the_wizard_counts_its_slice_in_the_low_dose_scan_and_rounds_to_the_nearest(slicerEnv, tinyModel):  # noqa: F811
    """The wizard's slice is `oneshot --slice`: a slice of the low-dose scan it adapts on, which
    need not be the volume being denoised (another grid: here 1.25 mm slices beside 2.5 mm), and the
    Red view between two slices is at the nearer one."""
    slicer, module, tempDir = slicerEnv
    widget, p = widgetOnTinyModel(module, tinyModel)
    other, m = makeVolume((8, 48, 48), name="Denoised input")
    fine = vtk.vtkMatrix4x4()
    fine.DeepCopy(m)
    fine.SetElement(2, 2, 1.25)
    fine.SetElement(2, 3, -137.5)
    ldct = H.volumeFromArray(slicer.util.arrayFromVolume(other)[[0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]], fine, "LD")
    ndct = H.volumeFromArray(slicer.util.arrayFromVolume(ldct) // 2, fine, "ND")
    p.inputVolume = other
    p.osLdctVolume, p.osNdctVolume, p.osSlice, p.osName = ldct, ndct, 2, "counted"
    logic = widget.logic
    widget._setOneShotStep(1)
    assert p.osSlice == 2 and logic.redSliceIndex(ldct) == 2
    logic.setRedSliceIndex(ldct, 9)  # the Red view moves: the wizard follows, counting in the low-dose scan
    assert p.osSlice == 9 and logic.redSliceIndex(other) != 9
    widget.ui.oneShotSliceSlider.setProperty("value", 4)  # the slider moves the Red view to that slice
    assert logic.redSliceIndex(ldct) == 4 and p.osSlice == 4
    for k, nearest in ((6.8, 7), (6.3, 6), (-0.4, 0), (11.4, 11)):
        logic.setRedSliceIndex(ldct, k)
        assert logic.redSliceIndex(ldct) == nearest, k
    logic.setRedSliceIndex(ldct, 11.6)  # past the last slice's half: on no slice
    assert logic.redSliceIndex(ldct) is None
    widget.onOneShotAdapt()
    args = [str(a) for a in H.launched[-1].args]
    assert args[args.index("--slice") + 1] == str(p.osSlice) == "11"
    widget.onOneShotAdapt()  # Cancel
    spin(slicer, lambda: not widget._oneShotJob.running, timeout=30)


def test_cancel_stops_what_a_launcher_started(slicerEnv):  # noqa: F811
    """In Slicer the command runs under PythonSlicer, a launcher that starts the real Python as its
    child: a Cancel that stopped the launcher alone left the run going, writing and holding memory."""
    slicer, module, tempDir = slicerEnv
    worker = ("import subprocess, sys, time\n"  # and it starts a helper of its own (a data loader, say)
              "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "for k in range(1, 1000):\n"
              "    print('PROGRESS %d 1000' % k, flush=True); time.sleep(0.05)\n")
    launcher = f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {worker!r}]))"
    job = module.CoreDiffProcess([sys.executable, "-c", launcher]).start()
    spin(slicer, lambda: job.done >= 2 or job.finished, timeout=30)
    assert not job.finished
    children = psutil.Process(job.proc.pid).children(recursive=True)
    assert len(children) == 2
    job.cancel()
    assert job.finished and job.cancelled and not job.succeeded
    for proc in [psutil.Process(job.proc.pid)] if psutil.pid_exists(job.proc.pid) else []:
        assert proc.status() == psutil.STATUS_ZOMBIE
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, "the launched Python outlived Cancel"


def test_a_preview_never_replaces_a_whole_result_in_the_node_it_once_used(slicerEnv, tinyModel):  # noqa: F811
    """The preview node chosen as the output of a whole run: the next Preview put one slice back
    into it, and the denoised volume was gone."""
    slicer, module, tempDir = slicerEnv
    widget, p = widgetOnTinyModel(module, tinyModel)
    ct, _ = makeVolume((6, 48, 48), name="CT")
    p.inputVolume = ct
    widget.logic.setRedSliceIndex(ct, 2)
    widget.ui.previewButton.click()
    spin(slicer, lambda: not widget._job.running, timeout=120)
    preview = widget._previewNode
    p.outputVolume = preview  # listed in the output selector like any volume
    widget.ui.applyButton.click()
    spin(slicer, lambda: not widget._job.running, timeout=120)
    assert widget._job.succeeded and slicer.util.arrayFromVolume(preview).shape == (6, 48, 48)
    p.outputVolume = None  # the selector moved on: the node still holds the whole result
    widget.logic.setRedSliceIndex(ct, 3)
    widget.ui.previewButton.click()
    spin(slicer, lambda: not widget._job.running, timeout=120)
    assert widget._job.succeeded and widget._previewNode is not preview
    assert slicer.util.arrayFromVolume(preview).shape == (6, 48, 48)  # the whole result, kept
    assert slicer.util.arrayFromVolume(widget._previewNode).shape == (1, 48, 48)
    again = widget._previewNode  # a preview node that holds a preview is still reused
    widget.ui.previewButton.click()
    spin(slicer, lambda: not widget._job.running, timeout=120)
    assert widget._previewNode is again


def test_a_volume_without_spacing_is_refused_in_words_and_cleanup_stops_a_run(slicerEnv, tinyModel):  # noqa: F811
    """Zero spacing failed as 'float division by zero'; cleanup() (Slicer closing, the module
    reloaded) must stop a run, which would otherwise call back into a widget that is gone; a copy
    of the scan that cannot be written leaves no part of it in the temporary folder."""
    slicer, module, tempDir = slicerEnv
    flat = slicer.util.addVolumeFromArray(np.zeros((3, 32, 32), np.int16), name="flat")
    flat.SetSpacing(0.7, 0.7, 0.0)
    with pytest.raises(ValueError, match="'flat' has no valid voxel spacing \\(0.7, 0.7, 0 mm\\)"):
        module.CoreDiffSlicerLogic.lpsGeometry(flat)
    widget, p = widgetOnTinyModel(module, tinyModel)
    ct, _ = makeVolume((6, 48, 48), name="CT")
    p.inputVolume = ct
    widget.ui.applyButton.click()
    job = widget._job
    assert job.running
    widget.cleanup()
    spin(slicer, lambda: not job.running, timeout=30)
    assert job.cancelled and all(proc.poll() is not None for proc in H.launched)
    assert slicer.mrmlScene.GetFirstNodeByName("CT denoised") is None

    def failingCopy(node, path):
        with open(path, "wb") as f:
            f.write(b"NRRD0004\n")  # a part of the scan on disk, then the disk is full
        raise OSError("No space left on device")
    logic = module.CoreDiffSlicerLogic()
    logic.writeVolume = failingCopy
    with pytest.raises(OSError, match="No space left"):
        logic.startDenoise(ct, modelArgs=("--model", tinyModel), device="cpu")
    assert os.listdir(tempDir) == []


def test_edges_a_red_view_past_the_last_slice_an_roi_past_the_volume_and_no_comparison(slicerEnv, tinyModel):  # noqa: F811,E501
    """Three edges no test reached: the Red view one slice beyond the volume shows none of it (a
    preview of 'slice N' was sent and failed in the library); an ROI beyond the volume along one
    axis only is outside it; with the comparison off, the result still gets the reader's window."""
    slicer, module, tempDir = slicerEnv
    widget, p = widgetOnTinyModel(module, tinyModel)
    logic = widget.logic
    node, _ = makeVolume((4, 64, 64), name="LDCT")
    p.inputVolume = node
    assert logic.axialAxis(node) == 2
    for k, shown in ((3, 3), (4, None), (0, 0), (-1, None)):
        logic.setRedSliceIndex(node, k)
        assert logic.redSliceIndex(node) == shown
    started = len(H.launched)
    widget.ui.previewButton.click()  # the Red view is one slice before the first
    assert len(H.launched) == started
    assert "The Red view does not show the input volume" in widget.ui.statusLabel.property("text")

    flat = slicer.util.addVolumeFromArray(np.zeros((3, 64, 64), np.int16), name="flat")  # IJK = RAS, 1 mm
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "above")
    roi.SetSize(20.0, 20.0, 1.0)
    roi.SetCenter(30.0, 30.0, 1.0)
    assert logic.roiStatistics(flat, flat, roi)["voxels"] == 21 * 21  # inside: the sizes' edges count
    roi.SetCenter(30.0, 30.0, 4.0)  # over the slices' range in x and y, beyond the last slice in z
    with pytest.raises(ValueError, match="The ROI is outside the volume"):
        logic.roiStatistics(flat, flat, roi)
    unplaced = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "new")  # as "Create new ROI" makes it
    with pytest.raises(ValueError, match="The ROI 'new' has no size yet: place it in a slice view"):
        logic.roiStatistics(flat, flat, unplaced)

    lm = slicer.app.layoutManager()
    layout = lm.layout
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetAutoWindowLevel(False)
    node.GetDisplayNode().SetWindowLevel(1500.0, -600.0)  # the reader's lung window
    p.showComparison = False
    widget.ui.applyButton.click()
    spin(slicer, lambda: not widget._job.running, timeout=90)
    assert widget._job.succeeded, widget._job.errorMessage
    out = slicer.mrmlScene.GetFirstNodeByName("LDCT denoised")
    d = out.GetDisplayNode()
    assert (d.GetWindow(), d.GetLevel(), d.GetAutoWindowLevel()) == (1500.0, -600.0, 0)
    assert lm.layout == layout != slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    assert lm.sliceWidget("Yellow").mrmlSliceCompositeNode().GetBackgroundVolumeID() != out.GetID()
    assert os.listdir(tempDir) == []
