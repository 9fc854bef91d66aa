"""The .ui and the module agree: widgets, classes, parameter bindings, scene wiring."""

import re
import typing
import xml.etree.ElementTree as ET

import pytest

import slicer_harness as H
from slicer_harness.fixtures import makeVolume, makeWidget, slicerEnv, waitIdle  # noqa: F401

UI_PATH = H.REPO_ROOT + "/CoreDiffSlicer/Resources/UI/CoreDiffSlicer.ui"
SOURCE = open(H.MODULE_PATH, encoding="utf-8").read()

# Class each referenced widget must have: the module relies on its API.
EXPECTED_CLASSES = {
    "inputSelector": "qMRMLNodeComboBox", "outputSelector": "qMRMLNodeComboBox",
    "roiSelector": "qMRMLNodeComboBox", "referenceSelector": "qMRMLNodeComboBox",
    "oneShotLdctSelector": "qMRMLNodeComboBox",
    "oneShotNdctSelector": "qMRMLNodeComboBox",
    "modelComboBox": "ctkComboBox", "deviceComboBox": "ctkComboBox",
    "contextComboBox": "ctkComboBox",
    "modelPathLineEdit": "ctkPathLineEdit", "clearModelFileButton": "QToolButton",
    "stepsSliderWidget": "ctkSliderWidget",
    "autoStepsCheckBox": "QCheckBox",
    "batchSizeSpinBox": "QSpinBox", "showComparisonCheckBox": "QCheckBox",
    "applyButton": "QPushButton", "previewButton": "QPushButton", "progressBar": "QProgressBar", "statusLabel": "QLabel",
    "refreshModelsButton": "QPushButton", "compareButton": "QPushButton", "flickerButton": "QPushButton",
    "measureButton": "QPushButton", "roiResultsLabel": "QLabel",
    "qualityButton": "QPushButton", "qualityResultsLabel": "QLabel",
    "oneShotStack": "QStackedWidget", "oneShotStepLabel": "QLabel", "oneShotBackButton": "QPushButton",
    "oneShotNextButton": "QPushButton", "oneShotSliceSlider": "QSlider", "oneShotSliceLabel": "QLabel",
    "oneShotPairedCheckBox": "QCheckBox", "oneShotNdctSliceSpinBox": "QSpinBox",
    "oneShotNameLineEdit": "QLineEdit", "oneShotAdaptButton": "QPushButton",
    "oneShotProgressBar": "QProgressBar", "oneShotStatusLabel": "QLabel",
    "oneShotResultLabel": "QLabel", "oneShotApplyButton": "QPushButton",
    "advancedCollapsibleButton": "ctkCollapsibleButton",
}


def uiWidgets():
    root = ET.parse(UI_PATH).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def test_top_level_is_qMRMLWidget():
    root = ET.parse(UI_PATH).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"


def test_every_referenced_widget_exists_with_expected_class():
    widgets = uiWidgets()
    referenced = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    assert referenced, "the module references no widget?"
    missing = referenced - set(widgets)
    assert not missing, f"widgets used by CoreDiffSlicer.py but absent from the .ui: {missing}"
    for name in referenced:
        assert name in EXPECTED_CLASSES, f"add the expected class of {name} to this test"
        assert widgets[name].get("class") == EXPECTED_CLASSES[name], name


def test_every_parameter_is_bound_by_exactly_one_widget(slicerEnv):  # noqa: F811
    slicer, module, _ = slicerEnv
    widgets = uiWidgets()
    bound = {}
    for name, w in widgets.items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", f"{name}: SlicerParameterName must be a dynamic property"
                bound.setdefault(prop.find("string").text, []).append(name)
    params = set(typing.get_type_hints(module.CoreDiffSlicerParameterNode, include_extras=True))
    assert set(bound) == params, (set(bound) ^ params)
    assert all(len(v) == 1 for v in bound.values()), bound


def test_connectGui_finds_a_connector_for_every_binding(slicerEnv):  # noqa: F811
    """Slicer raises RuntimeError when no GuiConnector fits a (widget, type) pair. The module
    binds through connectParametersToGui (whose tag disconnectGui can use) and binds the name and
    model-file fields itself."""
    slicer, module, _ = slicerEnv
    widget = makeWidget(module)
    tag = widget._parameterNodeGuiTag
    assert tag is not None
    connectors = widget._parameterNode._parameterGUIs[tag]
    params = set(typing.get_type_hints(module.CoreDiffSlicerParameterNode, include_extras=True))
    assert set(connectors) == params - set(module.CoreDiffSlicerWidget.MANUAL_BINDINGS)
    # the custom connectors are the ones chosen for the dynamic combo boxes and the int slider
    assert type(connectors["model"]).__name__ == "CtkComboBoxItemDataToStrConnector"
    assert type(connectors["device"]).__name__ == "CtkComboBoxItemDataToStrConnector"
    assert type(connectors["steps"]).__name__ == "CtkSliderWidgetToIntConnector"



def test_the_steps_slider_runs_to_the_chosen_model_files_own_t(slicerEnv, tmp_path):  # noqa: F811
    """The slider stopped at 10 (the shipped models' T): a model of one's own with T = 20 could not
    be run with more steps from Slicer."""
    from CoreDiffLib.models import save_weights
    from CoreDiffLib.network import ClearNet, NetworkConfig
    slicer, module, _ = slicerEnv
    widget = makeWidget(module)
    p = widget._parameterNode
    slider = widget.ui.stepsSliderWidget
    assert slider.maximum == 10.0
    own = tmp_path / "t20.safetensors"
    save_weights(ClearNet(NetworkConfig(width=4, steps=20)), own, {"dose": "test"})
    assert module.CoreDiffSlicerLogic.modelFileSteps(own) == 20
    widget.ui.modelPathLineEdit.setProperty("currentPath", str(own))
    assert slider.maximum == 20.0
    p.steps = 18
    assert slider.value == 18.0
    few = tmp_path / "t4.safetensors"
    save_weights(ClearNet(NetworkConfig(width=4, steps=4)), few, {"dose": "test"})
    widget.ui.modelPathLineEdit.setProperty("currentPath", str(few))
    assert slider.maximum == 4.0 and p.steps == 4  # more steps than the model has are not offered
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)  # unreadable: the shipped models' range
    widget.ui.modelPathLineEdit.setProperty("currentPath", str(tmp_path / "junk.safetensors"))
    assert slider.maximum == 10.0 and module.CoreDiffSlicerLogic.modelFileSteps(tmp_path / "junk.safetensors") is None
    widget.ui.modelPathLineEdit.setProperty("currentPath", "")
    assert slider.maximum == 10.0


def test_gui_and_parameter_node_stay_in_sync(slicerEnv):  # noqa: F811
    slicer, module, _ = slicerEnv
    widget = makeWidget(module)
    p = widget._parameterNode
    widget.ui.stepsSliderWidget.value = 3.0
    assert p.steps == 3 and isinstance(p.steps, int)
    p.steps = 7
    assert widget.ui.stepsSliderWidget.value == 7.0
    with pytest.raises(ValueError):
        p.steps = 0  # WithinRange(1, 50)
    with pytest.raises(TypeError):
        p.steps = 2.5
    # automatic steps by default (the library's --steps auto): the slider is off until unticked
    assert p.autoSteps is True and widget.ui.autoStepsCheckBox.property("checked")
    assert not widget.ui.stepsSliderWidget.property("enabled")
    widget.ui.autoStepsCheckBox.setProperty("checked", False)
    assert p.autoSteps is False and widget.ui.stepsSliderWidget.property("enabled")
    p.autoSteps = True
    assert not widget.ui.stepsSliderWidget.property("enabled")
    widget.ui.batchSizeSpinBox.setProperty("value", 4)
    assert p.batchSize == 4
    widget.ui.showComparisonCheckBox.setProperty("checked", False)
    assert p.showComparison is False
    # the fields the module binds itself: both ways, an empty path shown empty (not "."), and a
    # name edited in its middle keeps its cursor (Slicer's connector rewrote the text each key)
    assert widget.ui.modelPathLineEdit.property("currentPath") == "" and str(p.modelFile) == "."
    widget.ui.modelPathLineEdit.setProperty("currentPath", "/tmp/my.safetensors")
    assert str(p.modelFile) == "/tmp/my.safetensors"
    assert widget.ui.clearModelFileButton.property("enabled")
    widget.ui.modelPathLineEdit.setProperty("currentPath", "")  # emptied by hand: CTK's field says nothing
    assert str(p.modelFile) == "/tmp/my.safetensors"
    widget.ui.modelPathLineEdit.setProperty("currentPath", "/tmp/my.safetensors")
    widget.ui.clearModelFileButton.click()  # the way back to the Model list
    assert str(p.modelFile) == "." and widget.ui.modelPathLineEdit.property("currentPath") == ""
    assert not widget.ui.clearModelFileButton.property("enabled")
    p.modelFile = __import__("pathlib").Path("/tmp/saved.safetensors")  # a scene loaded with its model file
    assert widget.ui.modelPathLineEdit.property("currentPath") == "/tmp/saved.safetensors"
    p.modelFile = __import__("pathlib").Path()
    edit = widget.ui.oneShotNameLineEdit
    p.osName = "LDCT_oneshot"
    assert edit.property("text") == "LDCT_oneshot"
    edit.setProperty("cursorPosition", 4)
    from PySide6.QtTest import QTest
    QTest.keyClicks(edit, "_10")  # typed after "LDCT", key by key
    assert edit.property("text") == p.osName == "LDCT_10_oneshot"
    before = len(widget._parameterNode._parameterGUIs)
    for _ in range(3):  # leaving and re-entering the module does not stack bindings
        widget.parent.isEntered = False
        widget.exit()
        widget.parent.isEntered = True
        widget.enter()
    assert len(widget._parameterNode._parameterGUIs) == before



def test_scene_reaches_node_combo_boxes_through_ui_connections(slicerEnv):  # noqa: F811
    slicer, module, _ = slicerEnv
    widget = makeWidget(module)
    node, _ = makeVolume()
    for name in ("inputSelector", "outputSelector", "oneShotLdctSelector", "oneShotNdctSelector"):
        combo = getattr(widget.ui, name)
        assert combo.mrmlScene() is slicer.mrmlScene, name
        assert combo.nodeCount() == 1, name
    # input auto-selected (noneEnabled false) and Denoise enabled
    assert widget._parameterNode.inputVolume is node
    assert widget.ui.applyButton.property("enabled")
    assert widget.ui.outputSelector.currentNode() is None  # "Create new volume"



def test_output_equal_to_input_is_refused(slicerEnv):  # noqa: F811
    slicer, module, _ = slicerEnv
    widget = makeWidget(module)
    node, _ = makeVolume()
    widget._parameterNode.outputVolume = node
    assert not widget.ui.applyButton.property("enabled")
    assert "differ" in widget.ui.applyButton.property("toolTip")
    widget._parameterNode.outputVolume = None
    assert widget.ui.applyButton.property("enabled")
    with pytest.raises(ValueError):
        widget.logic.startDenoise(node, node)



def test_module_metadata(slicerEnv):  # noqa: F811
    slicer, module, _ = slicerEnv
    m = module.CoreDiffSlicer(H.moduleParent())
    assert m.parent.title == "CoreDiff Denoising"
    assert m.parent.categories == ["Filtering.Denoising"]
    assert "research use only" in m.parent.helpText.lower()
    assert "simulated" in m.parent.helpText
    assert "2304.01814" in m.parent.acknowledgementText and "IEEE" in m.parent.acknowledgementText
