"""CoreDiff low-dose CT denoising for 3D Slicer.

Module / Widget / Logic / Test in the shape of Slicer's scripted-module template
(Utilities/Templates/Modules/Scripted/TemplateKey.py).

All heavy work runs in a separate process: the library's command line interface
(``python -m CoreDiffLib.cli``) started with ``slicer.util.launchConsoleProcess``.
Its stdout (progress lines) is read on a background thread into a queue that a
``qt.QTimer`` drains on the GUI thread, so Slicer never freezes and every run can be
cancelled. Volumes travel through NRRD files in ``slicer.util.tempDirectory()``; the
geometry of the result is re-applied from the input node, so the output's IJKToRAS is
exactly the input's.

Qt properties are accessed as attributes (``button.enabled = False``), as PythonQt does.
"""

import json
import logging
import math
import os
import pathlib
import queue
import re
import shutil
import sys
import threading
import time
import uuid
from typing import Annotated, Optional

import numpy as np
import qt
import ctk
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    GuiConnector,
    WithinRange,
    parameterNodeGuiConnector,
    parameterNodeWrapper,
)
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode


#
# Where CoreDiffLib lives
#

def coreDiffLibParentDir() -> Optional[str]:
    """Directory that contains the ``CoreDiffLib`` package.

    Installed extension: ``CoreDiffLib/`` sits beside this file in ``qt-scripted-modules/``.
    Source tree: this file is ``<repo>/CoreDiffSlicer/CoreDiffSlicer.py`` and the package is
    ``<repo>/CoreDiffLib``.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(candidate, "CoreDiffLib", "__init__.py")):
            return candidate
    return None


def _ensureCoreDiffLibImportable() -> None:
    parent = coreDiffLibParentDir()
    if parent and parent not in sys.path:
        sys.path.append(parent)


_ensureCoreDiffLibImportable()


#
# CoreDiffSlicer
#

class CoreDiffSlicer(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CoreDiff Denoising"
        self.parent.categories = ["Filtering.Denoising"]
        self.parent.dependencies = []
        self.parent.contributors = ["CoreDiffSlicer contributors"]
        self.parent.helpText = """
Reduces noise in low-dose CT volumes with CoreDiff, a generalized diffusion model that
restores each axial slice using its two neighbours as context (slices less than 4 mm apart;
from 4 mm on each slice alone).
<ul>
<li><b>Denoise</b>: pick the CT volume, a model and a device, press Denoise. <i>Automatic</i>
(the default model) measures the scan's noise for the patient's size and runs the model trained
for the dose it looks like; the status line names it. The result goes into a new volume, or
replaces that scan's earlier result (the input is never modified), with exactly the input's
geometry. Work runs in a separate process: Slicer stays responsive and Cancel stops it at once.</li>
<li><b>Preview slice</b>: denoises only the slice under the Red view, in a few seconds on a
CPU, to judge a model or a number of steps before the whole volume.</li>
<li><b>Compare</b>: input and result side by side with linked slices and the same window/level,
a flicker toggle, the mean and standard deviation in HU inside an ROI before and after, and,
given a normal-dose reference on the same grid, PSNR / SSIM / RMSE of input and result.</li>
<li><b>One-shot adaptation</b>: adapt to a new dose level or scanner from one reference slice
(with a matching normal-dose slice, or an unpaired normal-dose slice); the adaptation is saved and
appears in the model list.</li>
</ul>
<b>Limits.</b> Research use only; not for diagnosis. Unless you choose your own model file, the
shipped models were trained on physically simulated low-dose data (projection-domain Poisson and
electronic noise, filtered back-projection) of synthetic phantoms, not on patient scans. Denoising
can remove or invent fine detail: always compare with the original. On the held-out phantoms a
4-6 mm lesion 20 HU from its background kept 0.6-0.8 of its contrast at 25 % dose and under 0.6 at
10 % and 5 % (docs/benchmarks/lesions). On two clinical chest CTs with 5 mm slices and simulated
dose reduction the models scored below the simpler RED-CNN and BM3D baselines
(docs/benchmarks/real_anatomy); with the shipped models slices 4 mm or more apart are each
denoised without their neighbours, which cost ~1 dB there (Advanced > Context overrides). Intensities are assumed to be
in Hounsfield units.
<p>More in the <a href="https://github.com/CoreDiffSlicer/CoreDiffSlicer#readme">documentation</a>
(the command line, the benchmarks, training and adapting models).</p>
"""
        self.parent.acknowledgementText = """
Based on CoreDiff: Q. Gao, Z. Li, J. Zhang, Y. Zhang, H. Shan, "CoreDiff: Contextual
Error-Modulated Generalized Diffusion Model for Low-Dose CT Denoising and Generalization",
IEEE Transactions on Medical Imaging, 2024 (arXiv:2304.01814). This Slicer extension and its
library are independent implementations by the CoreDiffSlicer contributors.
"""


#
# Parameter node GUI connectors for widgets the built-in connectors do not cover
#

@parameterNodeGuiConnector
class CtkComboBoxItemDataToStrConnector(GuiConnector):
    """Binds a str parameter to the *item data* of a ``ctkComboBox`` whose items are filled at
    run time (model list, detected devices). The built-in QComboBox connector needs a fixed
    ``Choice`` annotation; it only matches ``type(widget) == qt.QComboBox``, so it never claims a
    ctkComboBox."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == ctk.ctkComboBox and datatype == str

    @staticmethod
    def create(widget, datatype):
        if CtkComboBoxItemDataToStrConnector.canRepresent(widget, datatype):
            return CtkComboBoxItemDataToStrConnector(widget)
        return None

    def __init__(self, widget):
        super().__init__()
        self._widget = widget

    def _connect(self):
        self._widget.currentIndexChanged.connect(self._onIndexChanged)

    def _disconnect(self):
        self._widget.currentIndexChanged.disconnect(self._onIndexChanged)

    def _onIndexChanged(self, index):
        self.changed()

    def widget(self):
        return self._widget

    def read(self) -> str:
        index = self._widget.currentIndex
        if index < 0:
            return ""
        data = self._widget.itemData(index)
        return "" if data is None else str(data)

    def write(self, value) -> None:
        index = self._widget.findData(value)
        if index < 0:
            # Value not (yet) in the list, e.g. the model list is still loading: show it by name.
            self._widget.addItem(savedChoiceLabel(value), value)
            index = self._widget.findData(value)
        self._widget.currentIndex = index


@parameterNodeGuiConnector
class CtkSliderWidgetToIntConnector(GuiConnector):
    """Binds a bounded int parameter to a ``ctkSliderWidget`` (the built-in one handles float)."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        from slicer.parameterNodeWrapper import unannotatedType
        return type(widget) == ctk.ctkSliderWidget and unannotatedType(datatype) == int

    @staticmethod
    def create(widget, datatype):
        if CtkSliderWidgetToIntConnector.canRepresent(widget, datatype):
            return CtkSliderWidgetToIntConnector(widget, datatype)
        return None

    def __init__(self, widget, datatype):
        super().__init__()
        from slicer.parameterNodeWrapper import findFirstAnnotation, splitAnnotations
        self._widget = widget
        withinRange = findFirstAnnotation(splitAnnotations(datatype)[1], WithinRange)
        if withinRange is None:
            raise RuntimeError("CtkSliderWidgetToIntConnector needs a WithinRange annotation")
        self._widget.decimals = 0
        self._widget.singleStep = 1
        self._widget.minimum = withinRange.minimum
        self._widget.maximum = withinRange.maximum

    def _connect(self):
        self._widget.valueChanged.connect(self._onValueChanged)

    def _disconnect(self):
        self._widget.valueChanged.disconnect(self._onValueChanged)

    def _onValueChanged(self, value):
        self.changed()

    def widget(self):
        return self._widget

    def read(self) -> int:
        return int(round(self._widget.value))

    def write(self, value) -> None:
        self._widget.value = float(value)


#
# CoreDiffSlicerParameterNode
#

#: the most sampling steps the module offers: the slider stops at the chosen model's T, below this
MOST_STEPS = 50


@parameterNodeWrapper
class CoreDiffSlicerParameterNode:
    """State of the module, saved with the scene.

    inputVolume - the CT volume to denoise (HU).
    outputVolume - where to put the result; None (default) creates a new volume "<input> denoised".
    model - item data of the model list: "" = library default, "model:<name>", "adaptation:<name>".
    modelFile - a user model/checkpoint file; when set it overrides ``model``.
    device - "auto", "cpu" or a detected device name ("cuda:0", "mps").
    autoSteps - let the library choose the sampling steps: all T on a GPU, one on a CPU.
    steps - sampling steps (network evaluations per slice) when autoSteps is off.
    batchSize - slices per batch, 0 = chosen by the library from the device memory.
    context - what the network sees beside each slice: "auto" (the library's choice by slice
        spacing), "neighbours" or "own" (``corediff denoise --context``).
    showComparison - show the before/after layout when a run finishes.
    roi - region for the noise readout (None: a box at the centre of the current Red slice).
    referenceVolume - a normal-dose scan of the same geometry to score input and result against.
    os* - one-shot adaptation wizard.
    """
    inputVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    modelFile: pathlib.Path
    device: str = "auto"
    autoSteps: bool = True
    steps: Annotated[int, WithinRange(1, MOST_STEPS)] = 10  # every shipped model has T = 10
    batchSize: Annotated[int, WithinRange(0, 512)] = 0
    context: str = "auto"
    showComparison: bool = True
    roi: vtkMRMLMarkupsROINode
    referenceVolume: vtkMRMLScalarVolumeNode
    osLdctVolume: vtkMRMLScalarVolumeNode
    osSlice: Annotated[int, WithinRange(0, 100000)] = 0
    osPaired: bool = True
    osNdctVolume: vtkMRMLScalarVolumeNode
    osNdctSlice: Annotated[int, WithinRange(-1, 100000)] = -1  # -1: the library's choice
    osName: str = ""


#
# Background process running the corediff CLI
#

_PROGRESS_RE = re.compile(r"^PROGRESS\s+(\d+)\s+(\d+)\s*$")
_ERROR_PREFIX = "corediff: error:"


class CoreDiffProcess:
    """One run of the corediff command line interface in a separate process.

    stdout+stderr (merged by ``launchConsoleProcess``) are read line by line on a background
    thread into a queue; a ``qt.QTimer`` drains the queue on the GUI thread and calls the
    callbacks there. ``cancel()`` kills the whole process tree.
    """

    POLL_INTERVAL_MS = 100

    def __init__(self, args, cwd=None, onProgress=None, onInfo=None, onFinished=None, keepOutput=False):
        self.keepOutput = keepOutput  # keep every non-protocol line in self.output (JSON answers)
        self.output = []
        self.args = [str(a) for a in args]
        self.cwd = cwd
        self.onProgress = onProgress  # (done, total)
        self.onInfo = onInfo  # (text)
        self.onFinished = onFinished  # (process) - read returnCode / errorMessage / cancelled
        self.proc = None
        self.returnCode = None
        self.cancelled = False
        self.finished = False
        self.errorMessage = None
        self.result = None
        self.infoLines = []
        self.outputTail = []
        self.done = 0
        self.total = 0
        self.startTime = None
        self._firstProgress = None  # (time, slices done) at the first progress line
        self._queue = queue.Queue()
        self._thread = None
        self._timer = None

    def start(self):
        logging.info("CoreDiff: running " + " ".join(self.args))
        self.startTime = time.time()
        # useStartupEnvironment=False: the child gets Slicer's Python environment (PythonSlicer).
        self.proc = slicer.util.launchConsoleProcess(self.args, useStartupEnvironment=False, cwd=self.cwd)
        self._thread = threading.Thread(target=self._readOutput, name="CoreDiffProcessReader", daemon=True)
        self._thread.start()
        self._timer = qt.QTimer()
        self._timer.interval = self.POLL_INTERVAL_MS
        self._timer.timeout.connect(self.poll)
        self._timer.start()
        return self

    # background thread: never touches Qt or MRML
    def _readOutput(self):
        # bytes, decoded line by line: one undecodable byte (a path in another encoding) must
        # not stop the reading, or the child blocks on a full pipe and the run never ends
        stream = getattr(self.proc.stdout, "buffer", self.proc.stdout)
        try:
            for line in iter(stream.readline, stream.read(0)):
                if isinstance(line, bytes):
                    line = line.decode("utf-8", errors="replace")
                self._queue.put(("line", line.rstrip("\r\n")))
        except (ValueError, OSError):
            pass  # stream closed by cancel
        rc = self.proc.wait()
        self._queue.put(("exit", rc))

    def _handleLine(self, line):
        match = _PROGRESS_RE.match(line)
        if match:
            self.done, self.total = int(match.group(1)), int(match.group(2))
            if self._firstProgress is None:
                self._firstProgress = (time.time(), self.done)
            if self.onProgress:
                self.onProgress(self.done, self.total)
            return
        if line.startswith("INFO "):
            text = line[5:].strip()
            self.infoLines.append(text)
            if self.onInfo:
                self.onInfo(text)
            return
        if line.startswith("RESULT "):
            self.result = line[7:].strip()
            return
        if line.startswith(_ERROR_PREFIX):
            self.errorMessage = line[len(_ERROR_PREFIX):].strip()
        if self.keepOutput:
            self.output.append(line)
        elif line.strip():
            logging.info("corediff: " + line)
        if line.strip():
            self.outputTail = (self.outputTail + [line])[-20:]

    def poll(self):
        """Drain the queue (GUI thread). Returns True while the process is running."""
        if self.finished:
            return False
        while True:
            try:
                kind, value = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "line":
                self._handleLine(value)
            else:
                self.returnCode = value
                self._finish()
                return False
        return True

    def _finish(self):
        if self.finished:
            return
        self.finished = True
        if self._timer is not None:
            self._timer.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.returnCode not in (0, None) and not self.cancelled and not self.errorMessage:
            tail = [l for l in self.outputTail if l.strip()]
            if self.returnCode < 0:  # killed: its last line, a warning say, is not the reason
                self.errorMessage = (f"the denoising process was stopped by signal {-self.returnCode}"
                                     + (" (the system ran out of memory?): try a smaller batch size, or close "
                                        "other programs" if self.returnCode == -9 else ""))
            else:
                self.errorMessage = tail[-1] if tail else f"the denoising process failed (exit code {self.returnCode})"
        if self.onFinished:
            self.onFinished(self)

    @property
    def succeeded(self):
        return self.finished and not self.cancelled and self.returnCode == 0

    @property
    def running(self):
        return self.proc is not None and not self.finished

    def secondsLeft(self):
        """From the rate since the first progress line: loading torch and the model, and the
        dose check, happen once before it and are no part of the time per slice."""
        if self._firstProgress is None or self.total <= 0:
            return None
        since, doneThen = self._firstProgress
        if self.done <= doneThen:
            return None
        return (time.time() - since) / (self.done - doneThen) * (self.total - self.done)

    def cancel(self):
        """Kill the process and all its children (PythonSlicer is a launcher; torch may fork)."""
        if self.finished or self.proc is None:
            return
        self.cancelled = True
        killProcessTree(self.proc.pid)
        try:
            self.proc.wait(timeout=10)
        except Exception:
            pass
        # Drain what is left, then finish (the reader thread posts "exit").
        deadline = time.time() + 10
        while not self.finished and time.time() < deadline:
            self.poll()
            time.sleep(0.01)
        if not self.finished:
            self.returnCode = self.proc.poll()
            self._finish()

    def wait(self, timeout=None):
        """Block until finished while processing Qt events (scripts and self-tests)."""
        deadline = None if timeout is None else time.time() + timeout
        while not self.finished:
            slicer.app.processEvents()
            self.poll()
            if deadline is not None and time.time() > deadline:
                raise TimeoutError("corediff did not finish in time")
            time.sleep(0.02)
        return self.succeeded


def requirementMet(requirement: str) -> bool:
    """Whether an installed distribution meets ``name>=X.Y`` (no version: whether it is there);
    versions compared by their leading numbers, enough for these minimums."""
    import importlib.metadata
    name, _, minimum = requirement.partition(">=")
    try:
        installed = importlib.metadata.version(name.strip())
    except importlib.metadata.PackageNotFoundError:
        return False

    def numbers(version):  # three numbers, padded: 5.9 meets 5.9.0
        found = [int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3]]
        return tuple(found + [0] * (3 - len(found)))
    return not minimum or numbers(installed) >= numbers(minimum)


def killProcessTree(pid):
    """Kill a process and all its descendants, children first."""
    try:
        import psutil
    except ImportError:
        import signal
        try:
            os.kill(pid, signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
        except OSError:
            pass
        return
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = parent.children(recursive=True)
    for child in procs:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        parent.kill()
    except psutil.NoSuchProcess:
        pass
    psutil.wait_procs(procs + [parent], timeout=10)


#
# CoreDiffSlicerWidget
#

class CoreDiffSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    ONE_SHOT_STEP_TITLES = [
        "1. Low-dose volume of the new dose level",
        "2. Reference slice (follows the Red view)",
        "3. Normal-dose reference",
        "4. Name and adapt",
        "5. Saved: apply to the whole volume",
    ]

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._oneShotJob = None
        self._lastPair = None  # (inputNode, outputNode) of the last run
        self._pendingComparison = None  # (input, output, fit) of a run that ended while the module was hidden
        self._previewNode = None  # the one-slice preview volume, reused by the next preview of the same input
        self._previewInputID = None
        self._lastInputID = None  # the input the output selector was last checked against
        self._modelFileSteps: dict = {}  # model file -> its T, the steps slider's top ("": the shipped models)
        self._osNameSource = None  # (low-dose volume ID, the adaptation name proposed from its name)
        self._flickerTimer = None
        self._flickerOn = False
        self._observedSliceNode = None
        self._modelEntries = []
        self._adaptationNames = {}  # saved adaptation name -> usable, damaged or newer, from the last model list
        self._deviceEntries = []
        self._listedWithoutPackages = False  # the lists failed for want of a package: made again once installed
        self._lastAdaptation = None
        self._runWarnings = []  # the running denoise's doubts on its model, said again when it ends

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CoreDiffSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # MRML widgets get the scene through the .ui connections from mrmlSceneChanged(vtkMRMLScene*).
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CoreDiffSlicerLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Buttons
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.previewButton.clicked.connect(self.onPreviewButton)
        self.ui.refreshModelsButton.clicked.connect(self.refreshModelsAndDevices)
        self.ui.compareButton.clicked.connect(self.onCompareButton)
        self.ui.flickerButton.toggled.connect(self.onFlickerToggled)
        self.ui.measureButton.clicked.connect(self.onMeasureButton)
        self.ui.qualityButton.clicked.connect(self.onQualityButton)
        self.ui.oneShotBackButton.clicked.connect(self.onOneShotBack)
        self.ui.oneShotNextButton.clicked.connect(self.onOneShotNext)
        self.ui.oneShotAdaptButton.clicked.connect(self.onOneShotAdapt)
        self.ui.oneShotApplyButton.clicked.connect(self.onOneShotApply)
        self.ui.oneShotSliceSlider.valueChanged.connect(self.onOneShotSliceChanged)
        self.ui.oneShotNameLineEdit.textChanged.connect(self._onNameEdited)
        self.ui.modelPathLineEdit.currentPathChanged.connect(self._onModelPathChanged)
        # CTK's path field says nothing when it is emptied (its validator refuses an empty path), so
        # clearing it by hand kept the file: this button goes back to the Model list
        self.ui.clearModelFileButton.clicked.connect(self._onClearModelFile)

        self.ui.progressBar.visible = False
        self.ui.oneShotProgressBar.visible = False
        self.ui.statusLabel.text = ""
        self._setOneShotStep(0)
        fillComboBox(self.ui.contextComboBox, CONTEXT_CHOICES, "auto")  # fixed items, before the parameter node binds
        self._autoStepsToolTip = self.ui.autoStepsCheckBox.toolTip  # the .ui's, restored after an adaptation
        # and the lists' first items, shown while the lists load (seconds: the CLI imports torch)
        fillComboBox(self.ui.modelComboBox, [(AUTOMATIC_MODEL_LABEL, "")], "")
        fillComboBox(self.ui.deviceComboBox, [(AUTO_DEVICE_LABEL, "auto"), ("CPU", "cpu")], "auto")

        self.initializeParameterNode()
        self.refreshModelsAndDevices()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._stopFlicker()
        for job in list(self.logic._jobs) if self.logic else ():  # runs and the model/device listings:
            if job.running:  # none may call back into a widget that is gone
                job.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        pending, self._pendingComparison = self._pendingComparison, None
        if pending and all(slicer.mrmlScene.IsNodePresent(n) for n in pending[:2]):
            self._showComparison(*pending)  # a run that ended while another module was shown
        if self.ui.oneShotStack.currentIndex == 1:  # the wizard follows the Red view again
            self._observeRedSlice(True)
            self._syncSliceFromRed()

    def exit(self) -> None:
        # the views belong to other modules now: no flicker, no following the Red view
        self._stopFlicker()
        self._observeRedSlice(False)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        # a run's result belongs to the scene it was started in: stop it rather than let it land in the next
        for job in (self._job, self._oneShotJob):
            if job is not None and job.running:
                self.logic.cancel(job)
        self._stopFlicker()
        self._lastPair, self._pendingComparison = None, None
        self._previewNode, self._previewInputID = None, None
        self._lastAdaptation, self._osNameSource = None, None
        self._setOneShotStep(0)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            # the class itself: GetFirstNodeByClass would also give a label map
            for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                if node.GetClassName() == "vtkMRMLScalarVolumeNode":
                    self._parameterNode.inputVolume = node
                    break

    def setParameterNode(self, inputParameterNode: Optional[CoreDiffSlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # connectParametersToGui, not connectGui: released Slicer's connectGui returns no tag, so
            # disconnectGui could not undo it (Slicer issue #7547) and each enter() stacked another set
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self._boundWidgets())
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    #: parameters whose widgets the module binds itself: Slicer's connectors write a QLineEdit's
    #: text on every change (the cursor jumps to the end as the user types, scrambling a name) and
    #: show an empty pathlib.Path as "."
    MANUAL_BINDINGS = ("osName", "modelFile")

    def _boundWidgets(self) -> dict:
        """{parameter: widget} of the widgets the .ui names with the SlicerParameterName property."""
        bound = {}
        for widget in vars(self.ui).values():
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if name and name not in self.MANUAL_BINDINGS:
                bound[str(name)] = widget
        return bound

    def _fitStepsToModel(self) -> None:
        """The steps slider runs 1 to the chosen model's T: the shipped models' 10, or a model file's own
        (a model of one's own with T = 20 could not be run with more than 10 steps here)."""
        p = self._parameterNode
        path = "" if p is None or str(p.modelFile) in ("", ".") else str(p.modelFile)
        if path not in self._modelFileSteps:  # read once per file, not at every parameter change
            self._modelFileSteps[path] = (self.logic.modelFileSteps(path) if path else None) or self.logic.SHIPPED_STEPS
        top = min(self._modelFileSteps[path], MOST_STEPS)  # the parameter node's range
        if self.ui.stepsSliderWidget.maximum != top:
            self.ui.stepsSliderWidget.maximum = top
        if p is not None and p.steps > top:
            p.steps = top

    def _showManualBindings(self) -> None:
        """The name and model-file fields follow the parameter node only where they differ from it."""
        p = self._parameterNode
        if p is None:
            return
        name = p.osName or ""
        if self.ui.oneShotNameLineEdit.text != name:
            self.ui.oneShotNameLineEdit.text = name
        path = "" if str(p.modelFile) in ("", ".") else str(p.modelFile)
        if self.ui.modelPathLineEdit.currentPath != path:
            self.ui.modelPathLineEdit.currentPath = path
        self.ui.clearModelFileButton.enabled = bool(path)

    def _onNameEdited(self, text) -> None:
        if self._parameterNode is not None and self._parameterNode.osName != text:
            self._parameterNode.osName = text

    def _onModelPathChanged(self, path) -> None:
        if self._parameterNode is not None and str(self._parameterNode.modelFile) != (path or "."):
            self._parameterNode.modelFile = pathlib.Path(path) if path else pathlib.Path()

    def _onClearModelFile(self) -> None:
        self.ui.modelPathLineEdit.currentPath = ""
        self._onModelPathChanged("")

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        inputID = p.inputVolume.GetID() if p and p.inputVolume else None
        if inputID != self._lastInputID:
            self._lastInputID = inputID
            if self.ui.statusLabel.text.startswith("Failed"):  # about the scan selected before
                self.ui.statusLabel.text = ""
            out = p.outputVolume if p else None
            source = out.GetNodeReferenceID(self.logic.SOURCE_REFERENCE) if out else None
            # a result from before results named their scan: judged by its grid
            legacy = out is not None and source is None and out.GetAttribute("CoreDiff.model") is not None \
                and p.inputVolume is not None and p.inputVolume.GetImageData() is not None
            if inputID and (out is None or (source and source != inputID)
                            or (legacy and self.logic.gridMismatch(out, p.inputVolume))):
                # the result of another scan stays as it is: this one gets its own earlier result, which
                # the next Denoise replaces, or "Create new volume"
                p.outputVolume = self.logic.resultOf(p.inputVolume)
        self._showManualBindings()
        self._fitStepsToModel()
        adaptation = bool(self._parameterNode and self._parameterNode.model.startswith("adaptation:"))
        # an adaptation weighs all T steps of its model: the steps are not the user's to choose
        self.ui.autoStepsCheckBox.enabled = not adaptation
        self.ui.stepsSliderWidget.enabled = not adaptation and not (self._parameterNode
                                                                    and self._parameterNode.autoSteps)
        self.ui.autoStepsCheckBox.toolTip = (
            "A one-shot adaptation runs all of its model's steps: the steps cannot be chosen" if adaptation
            else self._autoStepsToolTip)
        self._checkCanApply()
        self._updateOneShotGui()

    # --- Denoise -----------------------------------------------------------------------------

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._job is not None and self._job.running:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop denoising; the scene is left as it was"
            self.ui.applyButton.enabled = True
            self.ui.previewButton.enabled = False
            return
        self.ui.applyButton.text = "Denoise"
        p = self._parameterNode
        reason = None
        if not p or not p.inputVolume:
            reason = "Select an input volume"
        elif p.inputVolume.GetClassName() != "vtkMRMLScalarVolumeNode" or (
                p.inputVolume.GetImageData() is not None
                and p.inputVolume.GetImageData().GetNumberOfScalarComponents() != 1):
            reason = "The input must be a CT volume (one value per voxel), not a label map or a colour image"
        elif p.outputVolume and p.outputVolume.GetID() == p.inputVolume.GetID():
            reason = "The output must differ from the input (leave it on 'Create new volume')"
        elif self._oneShotJob is not None and self._oneShotJob.running:
            reason = "A one-shot adaptation is running"
        self.ui.applyButton.enabled = reason is None
        self.ui.applyButton.toolTip = reason or DENOISE_TOOLTIP
        self.ui.previewButton.enabled = reason is None
        self.ui.previewButton.toolTip = reason or ("Denoise only the slice shown in the Red view, in seconds, "
                                                   "to judge the settings")
        if p and p.outputVolume and p.inputVolume and p.outputVolume.GetID() == p.inputVolume.GetID():
            self.ui.statusLabel.text = reason

    #: a Cancel click this soon after Denoise started is the second click of a double-click
    DOUBLE_CLICK_S = 0.5

    def onApplyButton(self) -> None:
        if self._job is not None and self._job.running:
            if (self._job.sliceIndex is None and self._job.startTime is not None  # (Preview is another button)
                    and time.time() - self._job.startTime < self.DOUBLE_CLICK_S):
                return  # Denoise became Cancel under the pointer: a double-click must not stop the run it started
            self.onCancel()
            return
        p = self._parameterNode
        if not self._dependenciesReady():
            self.ui.statusLabel.text = "Missing Python packages: denoising not started."
            return
        self._startDenoise(p.inputVolume, p.outputVolume, self.logic.modelArguments(p.model, p.modelFile))

    def onPreviewButton(self) -> None:
        """Denoise the slice at the centre of the Red view, shown beside the input (Yellow)."""
        p = self._parameterNode
        inputNode = p.inputVolume
        k = self.logic.redSliceIndex(inputNode)
        if k is None:
            self.ui.statusLabel.text = ("The Red view does not show the input volume: move it onto the scan to "
                                        "preview a slice, or use Denoise.")
            return
        if not self._dependenciesReady():
            self.ui.statusLabel.text = "Missing Python packages: preview not started."
            return
        if self._previewNode is not None and (slicer.mrmlScene.GetNodeByID(self._previewNode.GetID()) is None
                                              or self._previewInputID != inputNode.GetID()):
            self._previewNode = None  # deleted by the user, or the preview of another scan: a new one
        self._startDenoise(inputNode, self._previewNode, self.logic.modelArguments(p.model, p.modelFile),
                           sliceIndex=k)

    def _busy(self) -> Optional[str]:
        """Why nothing new may start now (a denoising or one-shot run is going), or None."""
        if self._job is not None and self._job.running:
            return "A denoising run is in progress"
        if self._oneShotJob is not None and self._oneShotJob.running:
            return "A one-shot adaptation is running"
        return None

    def _startDenoise(self, inputNode, outputNode, modelArgs, sliceIndex=None) -> None:
        busy = self._busy()
        if busy:  # one run at a time: Cancel must reach the run it names
            self.ui.statusLabel.text = f"{busy}: cancel it first."
            return
        p = self._parameterNode
        self.ui.progressBar.visible = True
        self.ui.progressBar.minimum = 0
        self.ui.progressBar.maximum = 0  # busy until the first PROGRESS line
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = "starting..."
        what = inputNode.GetName() if sliceIndex is None else f"slice {sliceIndex} of {inputNode.GetName()}"
        self.ui.statusLabel.text = f"Denoising {what}..."
        self._runWarnings = []
        try:
            self._job = self.logic.startDenoise(
                inputNode, outputNode, modelArgs=modelArgs, device=p.device,
                steps=None if p.autoSteps else p.steps,
                batchSize=p.batchSize, context=p.context, onProgress=self._onDenoiseProgress, onInfo=self._onInfo,
                onFinished=self._onDenoiseFinished, sliceIndex=sliceIndex)
        except Exception as e:
            self._job = None
            self.ui.progressBar.visible = False
            self.ui.statusLabel.text = f"Failed to start: {e}"
            slicer.util.errorDisplay(f"Failed to start denoising: {e}")
            logging.exception("CoreDiff: failed to start")
        self._checkCanApply()
        self._updateOneShotGui()

    def onCancel(self) -> None:
        if self._job is not None and self._job.running:
            self.ui.statusLabel.text = "Cancelling..."
            self.logic.cancel(self._job)

    def _onInfo(self, text) -> None:
        self.ui.statusLabel.text = text
        if text.startswith("warning: "):  # a doubt on the model's choice: said again when the run ends
            self._runWarnings.append(text[len("warning: "):])
        logging.info(f"CoreDiff: {text}")  # the status line moves on; notes on the input stay in the log

    def _onDenoiseProgress(self, done, total) -> None:
        bar = self.ui.progressBar
        left = self._job.secondsLeft() if self._job is not None else None
        bar.format = f"{done} / {total} slices" + (f", {formatDuration(left)} left" if left is not None else "")
        bar.maximum = max(total, 1)
        bar.value = min(done, total)

    def _onDenoiseFinished(self, job, outputNode, message) -> None:
        try:
            self._showDenoiseResult(job, outputNode, message)
        finally:  # the buttons come back whatever happened
            self._checkCanApply()
            self._updateOneShotGui()

    def _showDenoiseResult(self, job, outputNode, message) -> None:
        self.ui.progressBar.visible = False
        if job.cancelled:
            self.ui.statusLabel.text = "Cancelled. Nothing was changed."
        elif outputNode is not None:
            seconds = time.time() - job.startTime
            model, steps = outputNode.GetAttribute("CoreDiff.model"), outputNode.GetAttribute("CoreDiff.steps")
            ran = f" ({model}, {steps} steps)" if model and steps else ""
            adaptation = outputNode.GetAttribute("CoreDiff.adaptation")
            if ran and adaptation:
                ran = ran[:-1] + f", one-shot adaptation {adaptation})"
            if outputNode.GetAttribute("CoreDiff.context") == "each slice itself":  # thick slices: say so
                ran += ", each slice its own context"
            if job.sliceIndex is not None:  # a preview: one slice, beside the input whatever the setting
                self._previewNode, self._previewInputID = outputNode, job.inputNode.GetID()
                self.ui.statusLabel.text = (f"Preview of slice {job.sliceIndex} in {formatDuration(seconds)}{ran}: "
                                            "move the Red view and preview again, or Denoise the whole volume")
                self._showComparison(job.inputNode, outputNode, fit=False)
            else:
                self.ui.statusLabel.text = (f"Done in {formatDuration(seconds)}: {outputNode.GetName()}{ran}"
                                            + "".join(f"\nNote: {w}" for w in self._runWarnings))
                self._lastPair = (job.inputNode, outputNode)
                if outputNode is self._previewNode:  # it holds a whole result now: no preview may replace it
                    self._previewNode = None
                p = self._parameterNode
                if p and p.inputVolume is job.inputNode and p.outputVolume is not outputNode:
                    # as Slicer's modules do: the output selector shows the result, a second run
                    # replaces it instead of adding a copy, and the pair is saved with the scene
                    p.outputVolume = outputNode
                if self._parameterNode and self._parameterNode.showComparison:
                    # a radiologist reading the input in the Red view stays on that slice
                    self._showComparison(job.inputNode, outputNode, fit=None)
        else:
            self.ui.statusLabel.text = f"Failed: {message}"
            slicer.util.errorDisplay(f"Denoising failed:\n{message}", windowTitle="CoreDiff")

    def _showComparison(self, inputNode, outputNode, fit) -> None:
        """Before/after in the views now, or when the user comes back to this module: a run that
        ends while another module is shown must not change that module's layout and views.
        ``fit`` None: fit unless the Red view shows a slice of the input (where a reader stays)."""
        if not self.parent.isEntered:
            self._pendingComparison = (inputNode, outputNode, fit)
            return
        self._pendingComparison = None
        if fit is None:
            fit = not self.logic.redViewShowsSliceOf(inputNode)
        self.logic.showComparison(inputNode, outputNode, fit=fit)

    def _dependenciesReady(self) -> bool:
        """PyTorch and the packages present, installed now if the user agrees; the model and
        device lists, made before the packages were there, are made again once they are."""
        ready = self.logic.checkDependencies(interactive=True)
        if ready and self._listedWithoutPackages:
            self._listedWithoutPackages = False
            self.refreshModelsAndDevices()
        return ready

    # --- Models and devices ------------------------------------------------------------------

    def refreshModelsAndDevices(self) -> None:
        self.ui.refreshModelsButton.enabled = False
        self.logic.queryJson(["models", "--json"], self._onModelsListed)
        self.logic.queryJson(["devices", "--json"], self._onDevicesListed)

    def _missingPackages(self, error) -> bool:
        """Whether a listing failed for a package not installed yet (torch, or one the module installs
        with it, such as safetensors): said in the status line, and the lists are made again once
        Denoise has installed them. (``corediff models`` needs no PyTorch; ``devices`` does.)"""
        if "No module named" not in str(error):
            return False
        self._listedWithoutPackages = True
        self.ui.statusLabel.text = (
            "PyTorch is not installed yet: Denoise offers to install it" if "No module named 'torch'" in str(error)
            else "Python packages CoreDiff needs are not installed yet: Denoise offers to install them")
        return True

    def _onModelsListed(self, entries, error) -> None:
        self.ui.refreshModelsButton.enabled = True
        if error:
            if not self._missingPackages(error):
                self.ui.statusLabel.text = f"Could not list models: {error}"
            entries = []
        # names a new adaptation may only take by replacing (an outdated one is replaced anyway)
        self._adaptationNames = {str(e.get("name")): "newer" if e.get("newer") else "damaged" if e.get("damaged")
                                 else "usable" for e in entries or []
                                 if e.get("kind") == "adaptation" and not e.get("outdated")}
        self._modelEntries = [e for e in entries or [] if not e.get("damaged")]  # `corediff models` lists them
        items = [(AUTOMATIC_MODEL_LABEL, "")]
        fixed = len(items)
        for e in self._modelEntries:
            key = ("adaptation:" if e.get("kind") == "adaptation" else "model:") + str(e.get("name"))
            label = str(e.get("name"))
            if e.get("kind") == "adaptation":
                label = "One-shot: " + label
            dose = e.get("dose")
            if isinstance(dose, (int, float)) and not isinstance(dose, bool):  # a shipped model's fraction
                label += f" ({100 * dose:g} % dose)"
            elif dose:  # an adaptation's label, as its maker typed it ('10%')
                label += f" ({dose})"
            items.append((label, key))
        current = self._parameterNode.model if self._parameterNode else ""
        fillComboBox(self.ui.modelComboBox, items, current)
        self.ui.modelComboBox.setItemData(0, "Measures the scan's noise and the patient's size (corediff denoise "
                                          "--model auto) and picks the 25, 10 or 5 % model; a one-shot "
                                          "adaptation starts from the one nearest its reference's dose",
                                          qt.Qt.ToolTipRole)
        for i, e in enumerate(self._modelEntries):
            self.ui.modelComboBox.setItemData(i + fixed, e.get("description") or e.get("path") or "",
                                              qt.Qt.ToolTipRole)

    def _onDevicesListed(self, entries, error) -> None:
        if error:
            self._missingPackages(error)
        items = [(AUTO_DEVICE_LABEL, "auto")]
        self._deviceEntries = entries or []
        hasGpu = False
        for e in self._deviceEntries:
            name = str(e.get("name"))
            if name == "cpu":
                items.append(("CPU", "cpu"))
            else:
                hasGpu = True
                label = e.get("label") or name
                items.append((f"GPU: {label}", name))
        if not any(k == "cpu" for _, k in items):
            items.append(("CPU", "cpu"))
        current = self._parameterNode.device if self._parameterNode else "auto"
        fillComboBox(self.ui.deviceComboBox, items, current)
        self.ui.deviceComboBox.toolTip = (
            "Detected: " + ", ".join(l for l, _ in items[1:]) if entries else
            "Device detection failed: " + str(error))
        if entries is not None and not hasGpu:
            self.ui.deviceComboBox.toolTip += ("\nNo GPU found: denoising runs on the CPU, about 0.5-1.5 s per 512x512 "
                                               "slice with the automatic one step (ten steps take about ten "
                                               "times as long)")

    # --- Compare -----------------------------------------------------------------------------

    def _comparisonPair(self):
        """What the selectors name (what the user sees), else the last run's pair if it is of the
        selected input: another patient's must not be measured or shown under this one's name."""
        p = self._parameterNode
        if p and p.inputVolume and p.outputVolume and p.outputVolume.GetID() != p.inputVolume.GetID():
            return (p.inputVolume, p.outputVolume)
        if self._lastPair and all(slicer.mrmlScene.IsNodePresent(n) for n in self._lastPair) and (
                not p or not p.inputVolume or self._lastPair[0] is p.inputVolume):
            return self._lastPair
        return None

    def onCompareButton(self) -> None:
        pair = self._comparisonPair()
        if not pair:
            slicer.util.errorDisplay("Run Denoise first (or select an output volume).", windowTitle="CoreDiff")
            return
        self.logic.showComparison(*pair)

    def onFlickerToggled(self, on) -> None:
        pair = self._comparisonPair()
        if on and not pair:
            self.ui.flickerButton.checked = False
            return
        if on:
            self._flickerPair = pair
            self._flickerOn = False
            if self._flickerTimer is None:
                self._flickerTimer = qt.QTimer()
                self._flickerTimer.interval = 600
                self._flickerTimer.timeout.connect(self._flickerStep)
            self.logic.setFlicker(pair[0], pair[1], showOutput=False)
            self._flickerTimer.start()
        else:
            self._stopFlicker()

    def _flickerStep(self) -> None:
        if not all(slicer.mrmlScene.IsNodePresent(n) for n in self._flickerPair):  # one was deleted: stop
            self._stopFlicker()
            return
        self._flickerOn = not self._flickerOn
        self.logic.setFlicker(self._flickerPair[0], self._flickerPair[1], showOutput=self._flickerOn)

    def _stopFlicker(self) -> None:
        if self._flickerTimer is not None and self._flickerTimer.active:
            self._flickerTimer.stop()
            inputNode = self._flickerPair[0]  # the foreground is cleared even if a volume was deleted
            self.logic.setFlicker(inputNode if slicer.mrmlScene.IsNodePresent(inputNode) else None, None,
                                  showOutput=None)
        wasBlocked = self.ui.flickerButton.blockSignals(True)  # the button says what the view does
        self.ui.flickerButton.checked = False
        self.ui.flickerButton.blockSignals(wasBlocked)

    def onMeasureButton(self) -> None:
        pair = self._comparisonPair()
        if not pair:
            slicer.util.errorDisplay("Run Denoise first (or select an output volume).", windowTitle="CoreDiff")
            return
        try:
            stats = self.logic.roiStatistics(pair[0], pair[1], self._parameterNode.roi)
        except ValueError as e:
            self.ui.roiResultsLabel.text = str(e)
            return
        self.ui.roiResultsLabel.text = formatRoiStatistics(stats, (pair[0].GetName(), pair[1].GetName()))

    def onQualityButton(self) -> None:
        pair = self._comparisonPair()
        reference = self._parameterNode.referenceVolume
        if not pair:
            slicer.util.errorDisplay("Run Denoise first (or select an output volume).", windowTitle="CoreDiff")
            return
        if reference is None:
            self.ui.qualityResultsLabel.text = "Select the normal-dose reference scan first."
            return
        if not self._dependenciesReady():
            self.ui.qualityResultsLabel.text = "Missing Python packages: cannot score."
            return
        try:
            quality = self.logic.sliceQuality(pair[0], pair[1], reference)
        except ValueError as e:
            self.ui.qualityResultsLabel.text = str(e)
            return
        self.ui.qualityResultsLabel.text = formatSliceQuality(quality, (pair[0].GetName(), pair[1].GetName()))

    # --- One-shot wizard ---------------------------------------------------------------------

    def _setOneShotStep(self, step) -> None:
        self.ui.oneShotStack.currentIndex = step
        self.ui.oneShotStepLabel.text = self.ONE_SHOT_STEP_TITLES[step]
        p = self._parameterNode
        if step == 1 and p is not None and p.osLdctVolume is not None and p.osLdctVolume.GetImageData() is not None \
                and not self.logic.redViewShowsSliceOf(p.osLdctVolume):
            # the step follows the Red view: it must show this scan (at its middle, not an end slice)
            count = p.osLdctVolume.GetImageData().GetDimensions()[self.logic.axialAxis(p.osLdctVolume)]
            self.logic.showInRed(p.osLdctVolume, p.osSlice if 0 < p.osSlice < count else count // 2)
        if step == 1:
            self._observeRedSlice(True)
            self._syncSliceFromRed()
        else:
            self._observeRedSlice(False)
        self._updateOneShotGui()

    def _oneShotStepValid(self, step) -> Optional[str]:
        p = self._parameterNode
        if p is None:
            return "No parameter node"
        if step == 0 and not p.osLdctVolume:
            return "Select the low-dose volume"
        if step == 2:
            if not p.osNdctVolume:
                return "Select the normal-dose volume"
            if p.osNdctVolume.GetID() == (p.osLdctVolume.GetID() if p.osLdctVolume else None):
                return "The normal-dose volume must differ from the low-dose volume"
            if p.osPaired and p.osLdctVolume:
                problem = self.logic.gridMismatch(p.osNdctVolume, p.osLdctVolume)
                if problem and self.logic.oneSliceOf(p.osLdctVolume, p.osNdctVolume) is None:
                    return (f"{problem}: paired volumes must be aligned, or the normal-dose one a slice of the "
                            "low-dose scan (uncheck 'paired' for an unaligned scan)")
        if step == 3 and (self._oneShotJob is None or not self._oneShotJob.succeeded):
            return "Adapt first"
        return None

    def _updateOneShotGui(self) -> None:
        if not hasattr(self, "ui"):
            return
        step = self.ui.oneShotStack.currentIndex
        running = self._oneShotJob is not None and self._oneShotJob.running
        problem = self._oneShotStepValid(step)
        self.ui.oneShotBackButton.enabled = step > 0 and not running
        self.ui.oneShotNextButton.enabled = step < 4 and problem is None and not running
        self.ui.oneShotNextButton.toolTip = problem or ""
        p = self._parameterNode
        if p is not None:
            self.ui.oneShotNdctSliceSpinBox.enabled = not p.osPaired
            if p.osNdctVolume is not None and p.osNdctVolume.GetImageData() is not None:
                nNdct = p.osNdctVolume.GetImageData().GetDimensions()[self.logic.axialAxis(p.osNdctVolume)]
                if self.ui.oneShotNdctSliceSpinBox.maximum != nNdct - 1:
                    self.ui.oneShotNdctSliceSpinBox.maximum = nNdct - 1
            if p.osLdctVolume is not None and p.osLdctVolume.GetImageData() is not None:
                # axial slices, as `corediff oneshot --slice` counts them however the series is stored
                nSlices = p.osLdctVolume.GetImageData().GetDimensions()[self.logic.axialAxis(p.osLdctVolume)]
                if self.ui.oneShotSliceSlider.maximum != nSlices - 1:
                    self.ui.oneShotSliceSlider.maximum = nSlices - 1
                self.ui.oneShotSliceLabel.text = f"slice {p.osSlice} of 0..{nSlices - 1}"
            ldctID = p.osLdctVolume.GetID() if p.osLdctVolume is not None else None
            lastID, lastName = self._osNameSource or (None, None)
            if ldctID != lastID:  # a name is proposed when the volume changes, not on every edit
                proposed = (re.sub(r"[^A-Za-z0-9_.-]+", "_", p.osLdctVolume.GetName()) + "_oneshot"
                            if ldctID is not None else None)
                self._osNameSource = (ldctID, proposed)
                if proposed and (not p.osName or p.osName == lastName):  # the user's own name stays
                    p.osName = proposed
            adaptProblem = None
            if not p.osName:
                adaptProblem = "Enter a name"
            elif self._job is not None and self._job.running:
                adaptProblem = "A denoising run is in progress"
            self.ui.oneShotAdaptButton.enabled = running or (adaptProblem is None and p.osLdctVolume is not None
                                                             and p.osNdctVolume is not None)
            self.ui.oneShotAdaptButton.text = "Cancel" if running else "Adapt"
            self.ui.oneShotAdaptButton.toolTip = adaptProblem or ""
        self.ui.oneShotApplyButton.enabled = (self._lastAdaptation is not None and self._busy() is None
                                              and p is not None and p.osLdctVolume is not None)

    def onOneShotNext(self) -> None:
        step = self.ui.oneShotStack.currentIndex
        if self._oneShotStepValid(step) is None and step < 4:
            self._setOneShotStep(step + 1)

    def onOneShotBack(self) -> None:
        step = self.ui.oneShotStack.currentIndex
        if step > 0:
            self._setOneShotStep(step - 1)

    def _observeRedSlice(self, on) -> None:
        sliceNode = self.logic.redSliceNode()
        if self._observedSliceNode is not None:
            self.removeObserver(self._observedSliceNode, vtk.vtkCommand.ModifiedEvent, self._onRedSliceModified)
            self._observedSliceNode = None
        if on and sliceNode is not None:
            self._observedSliceNode = sliceNode
            self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self._onRedSliceModified)

    def _syncSliceFromRed(self) -> None:
        p = self._parameterNode
        if p is None or p.osLdctVolume is None:
            return
        k = self.logic.redSliceIndex(p.osLdctVolume)  # axial, as `oneshot --slice` counts
        if k is not None and k != p.osSlice:
            p.osSlice = k

    def _onRedSliceModified(self, caller=None, event=None) -> None:
        self._syncSliceFromRed()

    def onOneShotSliceChanged(self, value) -> None:
        p = self._parameterNode
        if p is None or p.osLdctVolume is None or self.ui.oneShotStack.currentIndex != 1:
            return
        if self.logic.redSliceIndex(p.osLdctVolume) != int(value):
            self.logic.setRedSliceIndex(p.osLdctVolume, int(value))

    def onOneShotAdapt(self) -> None:
        if self._oneShotJob is not None and self._oneShotJob.running:
            self.logic.cancel(self._oneShotJob)
            return
        if self._busy():  # a denoising run
            return
        p = self._parameterNode
        if not self._dependenciesReady():
            return
        where = self.logic.oneSliceOf(p.osLdctVolume, p.osNdctVolume) if p.osPaired else None
        if where is not None and where != p.osSlice:  # a one-slice normal-dose reference: its slice is the one
            p.osSlice = where
        held = self._adaptationNames.get(p.osName)
        if held == "newer":  # another installation's file, which this version cannot read: not to be replaced
            self.ui.oneShotStatusLabel.text = (f"An adaptation named '{p.osName}' was made by a newer CoreDiff: "
                                               "choose another name.")
            return
        overwrite = held is not None
        if overwrite and not slicer.util.confirmOkCancelDisplay(
                f"An adaptation named '{p.osName}' already exists"
                + (" (damaged: it cannot be used)" if held == "damaged" else "")
                + ". Replace it?", windowTitle="CoreDiff"):
            self.ui.oneShotStatusLabel.text = "Not adapted: choose another name, or replace the existing one."
            return
        self.ui.oneShotProgressBar.visible = True
        self.ui.oneShotProgressBar.maximum = 0
        self.ui.oneShotProgressBar.value = 0
        self.ui.oneShotStatusLabel.text = "Adapting..."
        self._lastAdaptation = None
        try:
            self._oneShotJob = self.logic.startOneShot(
                p.osLdctVolume, p.osSlice, p.osNdctVolume, paired=p.osPaired,
                ndctSlice=p.osNdctSlice if p.osNdctSlice >= 0 else None, name=p.osName, overwrite=overwrite,
                modelArgs=self.logic.modelArguments(p.model, p.modelFile, withAdaptation=False), device=p.device,
                onProgress=self._onOneShotProgress, onFinished=self._onOneShotFinished)
        except Exception as e:
            self.ui.oneShotProgressBar.visible = False
            self.ui.oneShotStatusLabel.text = f"Failed to start: {e}"
            slicer.util.errorDisplay(f"Failed to start the one-shot adaptation: {e}")
        self._updateOneShotGui()
        self._checkCanApply()

    def _onOneShotProgress(self, done, total) -> None:
        self.ui.oneShotProgressBar.maximum = max(total, 1)
        self.ui.oneShotProgressBar.value = min(done, total)

    def _onOneShotFinished(self, job, resultPath, message) -> None:
        self.ui.oneShotProgressBar.visible = False
        if job.cancelled:
            self.ui.oneShotStatusLabel.text = "Cancelled."
        elif resultPath:
            name = job.adaptationName  # the parameter node may be gone (scene closed) or edited since
            self._lastAdaptation = (name, resultPath)
            self.ui.oneShotStatusLabel.text = f"Saved as '{name}'"
            self.ui.oneShotResultLabel.text = (f"Adaptation '{name}' saved to\n{resultPath}\n"
                                               "It is now in the model list.")
            self.refreshModelsAndDevices()
            self._setOneShotStep(4)
        else:
            self.ui.oneShotStatusLabel.text = f"Failed: {message}"
            slicer.util.errorDisplay(f"One-shot adaptation failed:\n{message}", windowTitle="CoreDiff")
            self.refreshModelsAndDevices()  # a name saved meanwhile by another run is asked about next time
        self._updateOneShotGui()
        self._checkCanApply()

    def onOneShotApply(self) -> None:
        """One click: denoise the whole low-dose volume with the new adaptation."""
        p = self._parameterNode
        if not self._lastAdaptation or p is None or p.osLdctVolume is None or self._busy():
            return
        name, _ = self._lastAdaptation
        p.model = "adaptation:" + name  # the base model (list entry or file) stays as it was
        p.inputVolume = p.osLdctVolume
        p.outputVolume = None
        self._startDenoise(p.osLdctVolume, None, self.logic.modelArguments(p.model, p.modelFile))


#: the context choices (label, ``corediff denoise --context`` value) of the Advanced section
AUTOMATIC_MODEL_LABEL = "Automatic: the model for the scan's dose"
AUTO_DEVICE_LABEL = "Auto (fastest available)"
CONTEXT_CHOICES = [
    ("Automatic (by slice spacing)", "auto"),
    ("Adjacent slices", "neighbours"),
    ("Each slice alone", "own"),
]


#: the Output selector decides: "Create new volume", or the selected (earlier) result is replaced
DENOISE_TOOLTIP = "Denoise the input volume into the Output volume: a new one, or the selected result, replaced"


def savedChoiceLabel(data) -> str:
    """A list value as the user knows it: "model:corediff-25-w32" is corediff-25-w32."""
    if not data:
        return "(default)"
    kind, _, name = str(data).partition(":")
    return {"model": name, "adaptation": "One-shot: " + name}.get(kind, str(data))  # a device: cuda:1


def fillComboBox(comboBox, items, currentData) -> None:
    """Replace the items (label, data) of a combo box, keeping ``currentData`` selected."""
    wasBlocked = comboBox.blockSignals(True)
    try:
        comboBox.clear()
        for label, data in items:
            comboBox.addItem(label, data)
        index = comboBox.findData(currentData)
        if index < 0:  # a choice saved in a scene from another computer: kept, and said to be missing here
            comboBox.addItem(savedChoiceLabel(currentData) + (" (not found here)" if currentData else ""),
                             currentData)
            index = comboBox.findData(currentData)
        comboBox.currentIndex = index
    finally:
        comboBox.blockSignals(wasBlocked)


def formatDuration(seconds) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


def _named(names, k: int) -> str:
    """' (chest CT)': a readout says which volumes it measured, after the figures, so that the
    Before and After figures still stand one above the other."""
    return f" ({names[k]})" if names else ""


def formatRoiStatistics(stats, names=None) -> str:
    """``names``: (input, result) volume names, shown with their figures."""
    b, a = stats["before"], stats["after"]
    drop = (1.0 - a["std"] / b["std"]) * 100.0 if b["std"] > 0 else 0.0
    return (f"ROI ({stats['voxels']} voxels, {stats['where']})\n"
            f"Before: mean {b['mean']:.1f} HU, SD {b['std']:.1f} HU{_named(names, 0)}\n"
            f"After:  mean {a['mean']:.1f} HU, SD {a['std']:.1f} HU{_named(names, 1)}\n"
            + (f"Noise (SD) reduced by {drop:.0f} %" if drop >= 0 else f"Noise (SD) increased by {-drop:.0f} %"))


def formatSliceQuality(quality, names=None) -> str:
    """``names``: (input, result) volume names, shown with their figures."""
    lines = [f"Slice {quality['slice']} against {quality['reference']} (window -1000..1000 HU, as in the paper)"]
    for k, (label, key) in enumerate((("Input: ", "input"), ("Result:", "output"))):
        m = quality[key]
        lines.append(f"{label} PSNR {m.psnr:.2f} dB, SSIM {m.ssim:.4f}, RMSE {m.rmse_hu:.1f} HU{_named(names, k)}")
    return "\n".join(lines)


#
# CoreDiffSlicerLogic
#

class CoreDiffSlicerLogic(ScriptedLoadableModuleLogic):
    """Runs the CoreDiff library in a separate process and moves volumes in and out.

    Can be used without the widget::

        logic = CoreDiffSlicerLogic()
        outputNode = logic.denoise(inputNode, steps=10)  # blocks, processing Qt events
    """

    #: module -> pip requirement, the minimums of CoreDiffLib's pyproject.toml: another extension
    #: may have put an older one in Slicer's Python, which would fail in the middle of a run
    REQUIRED_PACKAGES = {"safetensors": "safetensors>=0.4", "skimage": "scikit-image>=0.21", "tqdm": "tqdm>=4.60",
                         "psutil": "psutil>=5.9", "scipy": "scipy>=1.10"}
    # offered with the required ones, or alone once a session, but optional: ONNX Runtime runs the
    # network 1.2-1.3 times as fast as PyTorch's channels-last on a CPU at one step
    # (docs/benchmarks/default/onnx_vs_eager_cl.md); a failed install of these
    # is logged and the module runs on PyTorch
    SPEEDUP_PACKAGES = {"onnx": "onnx>=1.15", "onnxruntime": "onnxruntime>=1.17"}
    SPEEDUP_GAIN = "1.2-1.3 times the speed on a CPU"
    _speedupsOffered = False  # this session (class-wide: every logic asks once, not each)
    TORCH_REQUIREMENT = ">=2.1"
    CT_WINDOW, CT_LEVEL = 350.0, 40.0
    #: node reference role from a result to the volume it was denoised from (saved with the scene)
    SOURCE_REFERENCE = "CoreDiffInput"

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._dependenciesOk = False
        self._jobs = []

    def getParameterNode(self):
        return CoreDiffSlicerParameterNode(super().getParameterNode())

    # --- environment -------------------------------------------------------------------------

    @staticmethod
    def pythonExecutable() -> str:
        """PythonSlicer in Slicer (same Python environment as Slicer, without the GUI)."""
        exe = shutil.which("PythonSlicer")
        if exe:
            return exe
        candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
        if os.path.isfile(candidate):
            return candidate
        return sys.executable

    def cliCommand(self, *args) -> list:
        return [self.pythonExecutable(), "-m", "CoreDiffLib.cli"] + [str(a) for a in args]

    def checkDependencies(self, interactive=True) -> bool:
        """torch through the PyTorch extension, the rest through pip (after asking)."""
        if self._dependenciesOk:
            return True
        import importlib.util
        if requirementMet("torch") and not requirementMet("torch" + self.TORCH_REQUIREMENT):
            # another extension's older torch: replacing it in a running Slicer takes a restart
            if interactive:
                import importlib.metadata
                slicer.util.errorDisplay(
                    f"CoreDiff needs PyTorch {self.TORCH_REQUIREMENT}; Slicer's Python has torch "
                    f"{importlib.metadata.version('torch')}. Update it (the PyTorch extension's PyTorch Utils "
                    f"module, or slicer.util.pip_install('torch{self.TORCH_REQUIREMENT}') in the Python "
                    "console) and restart Slicer.", windowTitle="CoreDiff")
            return False
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ImportError:
                if interactive:
                    slicer.util.errorDisplay("CoreDiff needs PyTorch. Install the 'PyTorch' extension from the "
                                             "Extensions Manager and restart Slicer.", windowTitle="CoreDiff")
                return False
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if not interactive:
                    return False
                try:
                    torch = torchLogic.installTorch(askConfirmation=True,
                                                    torchVersionRequirement=self.TORCH_REQUIREMENT)
                except Exception as e:  # offline, a proxy, a full disk: say so instead of a traceback
                    logging.exception("CoreDiff: installing PyTorch failed")
                    slicer.util.errorDisplay(f"Installing PyTorch failed: {e}\nCheck the network connection "
                                             "(or install the PyTorch extension's torch by hand) and try again.",
                                             windowTitle="CoreDiff")
                    return False
                if torch is None:
                    return False
        missing = [pip for mod, pip in self.REQUIRED_PACKAGES.items()
                   if importlib.util.find_spec(mod) is None or not requirementMet(pip)]
        speedups = [] if CoreDiffSlicerLogic._speedupsOffered or not interactive else [
            pip for mod, pip in self.SPEEDUP_PACKAGES.items() if importlib.util.find_spec(mod) is None]
        if missing and not interactive:
            return False
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                    "CoreDiff needs these Python packages: " + ", ".join(missing) + "."
                    + (f"\nIt also installs {', '.join(speedups)} (optional: {self.SPEEDUP_GAIN})."
                       if speedups else "") + "\nInstall them now?",
                    windowTitle="CoreDiff"):
                return False
            try:
                slicer.util.pip_install(" ".join(missing))
            except Exception as e:
                logging.exception("CoreDiff: pip install failed")
                slicer.util.errorDisplay(f"Installing {', '.join(missing)} failed: {e}\nCheck the network "
                                         "connection and try again, or install them from Slicer's Python "
                                         "console with slicer.util.pip_install.", windowTitle="CoreDiff")
                return False
        elif speedups and not slicer.util.confirmOkCancelDisplay(
                f"Install {', '.join(speedups)} (optional: {self.SPEEDUP_GAIN})? Without them CoreDiff runs "
                "on PyTorch.", windowTitle="CoreDiff"):
            speedups = []  # declined: not asked again this session
        CoreDiffSlicerLogic._speedupsOffered = CoreDiffSlicerLogic._speedupsOffered or interactive
        if speedups:
            try:
                slicer.util.pip_install(" ".join(speedups))
            except Exception:  # optional: the module runs on PyTorch without them
                logging.warning("CoreDiff: installing %s failed; denoising runs on PyTorch, more slowly "
                                "on a CPU", ", ".join(speedups), exc_info=True)
        if coreDiffLibParentDir() is None:
            if interactive:  # not a dialog on a test machine (ctest waits for no one to close it)
                slicer.util.errorDisplay("The CoreDiffLib package was not found next to the module.",
                                         windowTitle="CoreDiff")
            return False
        self._dependenciesOk = True
        return True

    @staticmethod
    def modelArguments(model: str, modelFile=None, withAdaptation=True) -> list:
        """CLI arguments for the model choice.

        ``model`` is the model list's item data ("" = the CLI's choice, ``--model auto``: the
        model of the dose nearest the scan's, also as a one-shot base; "model:<name>",
        "adaptation:<name>"); a user model file replaces the base model. An adaptation is tied to
        the base model it was learned for; without a model file the CLI loads that base model.
        """
        args = []
        hasFile = modelFile is not None and str(modelFile) not in ("", ".")
        if hasFile:
            args += ["--model", str(modelFile)]
        kind, _, name = (model or "").partition(":")
        if kind == "model" and name and not hasFile:
            args += ["--model", name]
        elif kind == "adaptation" and name and withAdaptation:
            args += ["--adaptation", name]
        return args

    #: T of every shipped model (the published setting): the steps slider's top unless a model file has another
    SHIPPED_STEPS = 10

    @staticmethod
    def modelFileSteps(modelFile) -> Optional[int]:
        """T of a CoreDiff weights file, from its safetensors header (8 bytes of length, then JSON:
        no PyTorch in Slicer's process); None when the file cannot tell."""
        try:
            with open(modelFile, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                if not 0 < length < 1 << 24:
                    return None
                header = json.loads(f.read(length))
            steps = int(json.loads(header["__metadata__"]["config"])["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return steps if steps >= 1 else None

    # --- processes ---------------------------------------------------------------------------

    @staticmethod
    def parseJsonOutput(text: str):
        """The JSON a ``--json`` command printed: stderr is merged into stdout, so warnings may come
        before or after it (and hold brackets); the JSON starts a line."""
        for start in (m.start() for m in re.finditer(r"(?m)^[\[{]", text)):
            try:
                return json.JSONDecoder().raw_decode(text[start:])[0]
            except ValueError:
                continue
        raise ValueError(f"unexpected output: {text[:200]!r}")

    def queryJson(self, args, callback) -> CoreDiffProcess:
        """Run ``corediff <args>`` (which prints JSON) in the background; callback(data, error)."""
        def finished(job):
            self._jobs.remove(job)
            if not job.succeeded:
                callback(None, job.errorMessage or "cancelled")
                return
            text = "\n".join(job.output)
            try:
                data = self.parseJsonOutput(text)
            except ValueError as e:
                callback(None, str(e))
                return
            callback(data, None)
        job = CoreDiffProcess(self.cliCommand(*args), cwd=coreDiffLibParentDir(), onFinished=finished,
                              keepOutput=True)
        self._jobs.append(job)
        return job.start()

    def cancel(self, job) -> None:
        job.cancel()

    #: the command line's words for what the module's controls set, as the user sees them
    _GUI_WORDS = ((re.compile(r"--device (\w+(?::\d+)?)"), r"Device '\1'"),  # not the comma in 'cpu,'
                  (re.compile(r"run 'corediff oneshot' first"), "make one in the One-shot adaptation section"),
                  (re.compile(r"run 'corediff oneshot'(?: again| for this model)?(?: to refit it)?"
                              r"(?: \(the same --name replaces it\))?"),
                   "adapt again in the One-shot adaptation section"),
                  (re.compile(r"give that model with --model"), "choose that model in the Model list"),
                  (re.compile(r"(choose (?:one|the model(?: for its dose)?)) with --model"), r"\1 in the Model list"),
                  (re.compile(r"--model NAME overrides"), "the Model list overrides it"),
                  (re.compile(r"--model auto"), "the Automatic model"),
                  (re.compile(r"\(--steps auto\)"), "(Automatic steps)"),
                  (re.compile(r"--steps 10 runs"), "10 steps run"),
                  (re.compile(r"--slice (\d+)"), r"reference slice \1"),
                  (re.compile(r"\(use --ndct-unpaired otherwise\)"), "(untick 'paired' otherwise)"),
                  (re.compile(r"--ndct and --ldct"), "the normal-dose and low-dose volumes"),
                  (re.compile(r"--ndct-slice"), "the normal-dose slice"),
                  (re.compile(r"choose another --name/--out or pass --overwrite"),
                   "choose another name, or Adapt again to replace it"))

    @classmethod
    def guiMessage(cls, message, files) -> str:
        """A command-line error as the module's user sees it: the temporary files the module wrote
        named by their volumes (``files``: path -> node name), flags by the controls that set them."""
        message = message or ""
        for path, name in files.items():
            message = message.replace(str(path), f"'{name}'")
        for pattern, words in cls._GUI_WORDS:
            message = pattern.sub(words, message)
        return message

    # --- volumes in and out ------------------------------------------------------------------

    @staticmethod
    def lpsGeometry(volumeNode):
        """Spacing, origin and direction (row-major 3 x 3) of a volume in LPS, as ITK and the library see it."""
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        spacing = [float(s) for s in volumeNode.GetSpacing()]
        if not all(math.isfinite(s) and s > 0 for s in spacing):
            given = ", ".join(f"{s:g}" for s in spacing)
            raise ValueError(f"the volume '{volumeNode.GetName()}' has no valid voxel spacing ({given} mm): set its "
                             "spacing in the Volumes module (Volume Information) first")
        direction = []
        for row in range(3):
            for col in range(3):
                value = ijkToRAS.GetElement(row, col) / spacing[col]
                direction.append(-value if row < 2 else value)  # RAS -> LPS
        origin = [-ijkToRAS.GetElement(0, 3), -ijkToRAS.GetElement(1, 3), ijkToRAS.GetElement(2, 3)]
        return spacing, origin, direction

    @staticmethod
    def axialAxis(volumeNode) -> int:
        """The IJK axis (0, 1 or 2) that runs head-foot: CoreDiff denoises the planes across it.

        2 for the usual axial series; 0 or 1 for one stored sagittally or coronally. Asked of the
        library's own rule (``CoreDiffLib.orientation.axial_layout``, NumPy only), so that a
        preview, a readout and a whole run always agree on the planes (thin slabs and oblique
        volumes included).
        """
        from CoreDiffLib.orientation import axial_layout
        _, _, direction = CoreDiffSlicerLogic.lpsGeometry(volumeNode)
        i, j, k = volumeNode.GetImageData().GetDimensions()
        layout = axial_layout(direction, (k, j, i))
        return 2 if layout is None else 2 - layout.perm[0]

    @staticmethod
    def axialPlane(array, axis, k):
        """Plane ``k`` across IJK ``axis`` of a (k, j, i) volume array (IJK axis a is array axis 2 - a)."""
        return np.take(array, k, axis=2 - axis)

    @staticmethod
    def shiftedIJKToRAS(volumeNode, axis, start) -> vtk.vtkMatrix4x4:
        """IJK-to-RAS of the sub-volume that starts at index ``start`` along IJK ``axis``."""
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        point = [0.0, 0.0, 0.0, 1.0]
        point[axis] = float(start)
        origin = ijkToRAS.MultiplyPoint(point)
        for row in range(3):
            ijkToRAS.SetElement(row, 3, origin[row])
        return ijkToRAS

    @staticmethod
    def writeVolume(volumeNode, path) -> None:
        """Write the voxels of a volume node to NRRD with its geometry converted to LPS."""
        import SimpleITK as sitk
        array = slicer.util.arrayFromVolume(volumeNode)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        spacing, origin, direction = CoreDiffSlicerLogic.lpsGeometry(volumeNode)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        sitk.WriteImage(image, str(path), False)

    @staticmethod
    def readArray(path) -> np.ndarray:
        """The file's voxels in its own type (the library writes the input's: int16 for CT)."""
        import SimpleITK as sitk
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    @staticmethod
    def defaultOutputName(inputNode, preview=False) -> str:
        return slicer.mrmlScene.GenerateUniqueName(f"{inputNode.GetName()} {'preview' if preview else 'denoised'}")

    def startDenoise(self, inputNode, outputNode=None, modelArgs=(), device="auto", steps=None, batchSize=0,
                     onProgress=None, onInfo=None, onFinished=None, sliceIndex=None,
                     context="auto") -> CoreDiffProcess:
        """Start denoising in the background. onFinished(job, outputNode or None, errorMessage).

        ``steps`` None lets the library choose (``--steps auto``: all T on a GPU, one on a CPU).
        ``context`` is ``corediff denoise --context``: "auto" (neighbours below 4 mm of slice
        spacing, the slice itself from there on), "neighbours" or "own".
        ``sliceIndex`` K denoises only axial slice K (a preview, seconds even on a CPU): the
        output is a one-slice volume ("<input> preview") placed where that slice lies. The whole
        volume is handed over, so the model ``--model auto`` picks and the slice's neighbours are
        those of a whole run, and the preview is that run's slice K.

        The output node is created (or updated) only on success, so the scene is unchanged
        after a failure or a cancel.
        """
        if inputNode is None or inputNode.GetImageData() is None:
            raise ValueError("the input volume has no image data")
        if outputNode is not None and outputNode.GetID() == inputNode.GetID():
            raise ValueError("the output volume must differ from the input volume")
        contexts = [value for _, value in CONTEXT_CHOICES]
        if context not in contexts:
            raise ValueError(f"context must be one of {', '.join(contexts)}, not {context!r}")
        preview = None
        if sliceIndex is not None:
            axis = self.axialAxis(inputNode)
            count = inputNode.GetImageData().GetDimensions()[axis]
            if not 0 <= sliceIndex < count:
                raise ValueError(f"slice {sliceIndex} is outside the volume's 0..{count - 1}")
            preview = (axis, sliceIndex)
        runDir = slicer.util.tempDirectory("CoreDiff-" + uuid.uuid4().hex[:8])
        inputPath = os.path.join(runDir, "input.nrrd")
        outputPath = os.path.join(runDir, "output.nrrd")
        try:
            self.writeVolume(inputNode, inputPath)
        except Exception:
            shutil.rmtree(runDir, ignore_errors=True)
            raise
        args = ["denoise", inputPath, outputPath, *modelArgs, "--device", device or "auto", "--progress", "lines"]
        if steps and "--adaptation" not in modelArgs:  # an adaptation weighs all T steps of its model
            args += ["--steps", int(steps)]
        if batchSize:
            args += ["--batch-size", int(batchSize)]
        if context != "auto":
            args += ["--context", context]
        if preview is not None:  # counted in axial slices, as the library denoises them
            args += ["--slices", int(sliceIndex)]

        def finished(job):
            if job in self._jobs:
                self._jobs.remove(job)
            resultNode, message = None, None
            try:
                if job.succeeded and not slicer.mrmlScene.IsNodePresent(inputNode):  # deleted, or the scene closed
                    message = "the input volume was removed from the scene during the run; nothing was added"
                elif job.succeeded:
                    # an output volume deleted during the run (the selector then shows "Create new
                    # volume"): the finished work goes into a new one
                    present = outputNode is not None and slicer.mrmlScene.IsNodePresent(outputNode)
                    resultNode = self._importResult(inputNode, outputNode if present else None, outputPath, preview)
                elif not job.cancelled:
                    message = self.guiMessage(job.errorMessage, {inputPath: inputNode.GetName()})
            except Exception as e:
                logging.exception("CoreDiff: could not load the result")
                message = f"could not load the result: {e}"
                resultNode = None
            finally:
                shutil.rmtree(runDir, ignore_errors=True)
            if onFinished:
                onFinished(job, resultNode, message)

        files = {inputPath: inputNode.GetName(), outputPath: "the result"}
        job = CoreDiffProcess(self.cliCommand(*args), cwd=coreDiffLibParentDir(), onProgress=onProgress,
                              onInfo=(lambda text: onInfo(self.guiMessage(text, files))) if onInfo else None,
                              onFinished=finished)
        job.inputNode = inputNode
        job.sliceIndex = sliceIndex
        return self._launch(job, runDir)

    def _launch(self, job, runDir) -> CoreDiffProcess:
        """Start ``job``, which owns ``runDir``; a job that cannot start (no Python launcher, no
        permission) takes its temporary copies of the scan with it."""
        job.runDir = runDir
        self._jobs.append(job)
        try:
            return job.start()
        except Exception:
            self._jobs.remove(job)
            shutil.rmtree(runDir, ignore_errors=True)
            raise

    @staticmethod
    def readProvenance(path) -> dict:
        """The ``corediff_*`` header keys the library writes (model, steps, device...), unprefixed."""
        import SimpleITK as sitk
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        prefix = "corediff_"
        return {k[len(prefix):]: reader.GetMetaData(k) for k in reader.GetMetaDataKeys() if k.startswith(prefix)}

    def _importResult(self, inputNode, outputNode, outputPath, preview=None):
        """Load the result into a node with the input's geometry (``preview`` (axis, K): of its slice K)."""
        # in its own type: a float32 copy of an int16 result doubled the memory and the saved scene
        array = self.readArray(outputPath)
        expected = list(slicer.util.arrayFromVolume(inputNode).shape)
        axis, start = preview if preview is not None else (2, 0)
        if preview is not None:
            expected[2 - axis] = 1
        if tuple(array.shape) != tuple(expected):
            raise ValueError(f"result has shape {array.shape}, expected {tuple(expected)}")
        ijkToRAS = self.shiftedIJKToRAS(inputNode, axis, start)
        if outputNode is None:
            outputNode = slicer.util.addVolumeFromArray(array, ijkToRAS,
                                                        self.defaultOutputName(inputNode, preview is not None))
        else:
            slicer.util.updateVolumeFromArray(outputNode, array)
            outputNode.SetIJKToRASMatrix(ijkToRAS)
        # under the input's transform (a registered scan), so it shows where the input shows
        outputNode.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())
        for name in outputNode.GetAttributeNames() or ():  # a reused node: none of an earlier run's may stay
            if name.startswith("CoreDiff."):
                outputNode.RemoveAttribute(name)
        for key, value in self.readProvenance(outputPath).items():  # saved with the scene
            outputNode.SetAttribute(f"CoreDiff.{key}", value)
        outputNode.SetNodeReferenceID(self.SOURCE_REFERENCE, inputNode.GetID())  # whose result it is
        if outputNode.GetDisplayNode() is None:
            outputNode.CreateDefaultDisplayNodes()
        window, level = self.displayWindowLevel(inputNode)
        outDisplay = outputNode.GetDisplayNode()
        outDisplay.SetAutoWindowLevel(False)
        outDisplay.SetWindowLevel(window, level)
        # Beside the input in the subject hierarchy
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        inItem = shNode.GetItemByDataNode(inputNode)
        outItem = shNode.GetItemByDataNode(outputNode)
        if inItem and outItem:
            shNode.SetItemParent(outItem, shNode.GetItemParent(inItem))
        return outputNode

    def displayWindowLevel(self, inputNode):
        """The input's window/level if the user set one, else the CT soft-tissue window (W 350 / L 40)."""
        display = inputNode.GetDisplayNode()
        if display is not None and not display.GetAutoWindowLevel():
            return display.GetWindow(), display.GetLevel()
        return self.CT_WINDOW, self.CT_LEVEL

    def denoise(self, inputNode, outputNode=None, model="", modelFile=None, device="auto", steps=None,
                batchSize=0, timeout=None, sliceIndex=None, context="auto"):
        """Blocking convenience wrapper (scripts, self-test). Returns the output node
        (``sliceIndex`` K: the one-slice preview of axial slice K; ``context``: see :meth:`startDenoise`)."""
        result = {}

        def finished(job, node, message):
            result.update(node=node, message=message, cancelled=job.cancelled)
        job = self.startDenoise(inputNode, outputNode, self.modelArguments(model, modelFile), device, steps,
                                batchSize, onFinished=finished, sliceIndex=sliceIndex, context=context)
        try:
            job.wait(timeout)
        except TimeoutError:  # stop it: a result must not appear in the scene after the caller gave up
            self.cancel(job)
            raise
        if result.get("node") is None:
            raise RuntimeError(result.get("message") or "cancelled")
        return result["node"]

    def startOneShot(self, ldctNode, sliceIndex, ndctNode, paired=True, ndctSlice=None, name="oneshot",
                     modelArgs=(), onProgress=None, onFinished=None, overwrite=False,
                     device="auto") -> CoreDiffProcess:
        """Adapt to a new dose level from one slice. onFinished(job, adaptationPath or None, error).

        ``ndctSlice`` None: the library's choice; ``overwrite``: replace an adaptation of that name."""
        runDir = slicer.util.tempDirectory("CoreDiff-oneshot-" + uuid.uuid4().hex[:8])
        ldctPath = os.path.join(runDir, "ldct.nrrd")
        ndctPath = os.path.join(runDir, "ndct.nrrd")
        try:
            self.writeVolume(ldctNode, ldctPath)
            self.writeVolume(ndctNode, ndctPath)
        except Exception:
            shutil.rmtree(runDir, ignore_errors=True)
            raise
        args = ["oneshot", *modelArgs, "--ldct", ldctPath, "--slice", int(sliceIndex), "--device", device or "auto"]
        if paired:
            args += ["--ndct", ndctPath]
        else:
            args += ["--ndct-unpaired", ndctPath]
            if ndctSlice is not None:
                args += ["--ndct-slice", int(ndctSlice)]
        args += ["--name", name, "--progress", "lines"]
        if overwrite:
            args.append("--overwrite")

        def finished(job):
            if job in self._jobs:
                self._jobs.remove(job)
            shutil.rmtree(runDir, ignore_errors=True)
            path = job.result if job.succeeded else None
            message = None if job.succeeded or job.cancelled else self.guiMessage(
                job.errorMessage, {ldctPath: ldctNode.GetName(), ndctPath: ndctNode.GetName()})
            if job.succeeded and not path:
                message = "the adaptation finished without reporting where it was saved"
            if onFinished:
                onFinished(job, path, message)

        job = CoreDiffProcess(self.cliCommand(*args), cwd=coreDiffLibParentDir(),
                              onProgress=onProgress, onFinished=finished)
        job.adaptationName = name
        return self._launch(job, runDir)

    # --- views -------------------------------------------------------------------------------

    @staticmethod
    def _compositeNode(viewName):
        return slicer.app.layoutManager().sliceWidget(viewName).sliceLogic().GetSliceCompositeNode()

    def redSliceNode(self):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None or layoutManager.sliceWidget("Red") is None:
            return None
        return layoutManager.sliceWidget("Red").mrmlSliceNode()

    def redViewShowsSliceOf(self, volumeNode) -> bool:
        """True when the Red view shows ``volumeNode`` at one of its slices: a place the user chose."""
        if self.redSliceNode() is None or self._compositeNode("Red").GetBackgroundVolumeID() != volumeNode.GetID():
            return False
        return self.redSliceIndex(volumeNode) is not None

    def showComparison(self, inputNode, outputNode, fit=True) -> None:
        """Side-by-side: input in Red, output in Yellow, linked, same window/level.

        ``fit`` False keeps the views where they are (a preview: the Red view is at its slice).
        """
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        window, level = self.displayWindowLevel(inputNode)
        for node in (inputNode, outputNode):
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetAutoWindowLevel(False)
            node.GetDisplayNode().SetWindowLevel(window, level)
        for viewName, volume in (("Red", inputNode), ("Yellow", outputNode)):
            composite = self._compositeNode(viewName)
            composite.SetBackgroundVolumeID(volume.GetID())
            composite.SetForegroundVolumeID(None)
            composite.SetLinkedControl(True)
            composite.SetHotLinkedControl(True)
            # Same orientation in both views so linked slices show the same anatomy: the scan's own
            # planes when they are oblique (a tilted gantry), where a world-axial view would cut
            # across them (and show a one-slice preview as a strip)
            self._showAxialPlanes(layoutManager.sliceWidget(viewName).mrmlSliceNode(), inputNode)
        if fit:
            for viewName in ("Red", "Yellow"):
                layoutManager.sliceWidget(viewName).sliceLogic().FitSliceToAll()
        else:  # Yellow shows what Red shows: same plane, centre and zoom
            red, yellow = (layoutManager.sliceWidget(v).mrmlSliceNode() for v in ("Red", "Yellow"))
            yellow.GetSliceToRAS().DeepCopy(red.GetSliceToRAS())
            yellow.SetFieldOfView(*red.GetFieldOfView())
            yellow.UpdateMatrices()

    @classmethod
    def axialPlanesTilted(cls, volumeNode, tolerance=1e-3) -> bool:
        """True when the planes CoreDiff denoises are not world-axial (in the world, under the
        volume's linear transform): a tilted gantry, or a scan registered at an angle. A plane
        rotated within itself is still axial."""
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        axis = cls.axialAxis(volumeNode)
        normal = [ijkToRAS.GetElement(r, axis) for r in range(3)] + [0.0]
        transformNode = volumeNode.GetParentTransformNode()
        if transformNode is not None and transformNode.IsTransformToWorldLinear():
            toWorld = vtk.vtkMatrix4x4()
            transformNode.GetMatrixTransformToWorld(toWorld)
            normal = toWorld.MultiplyPoint(normal)
        return abs(normal[2]) < (1.0 - tolerance) * float(np.linalg.norm(normal[:3]))

    def _showAxialPlanes(self, sliceNode, volumeNode) -> None:
        """A view in the volume's axial planes: world-axial, or the scan's own when they are
        tilted (a tilted gantry), where a world-axial view would cut across them."""
        sliceNode.SetOrientation("Axial")
        if self.axialPlanesTilted(volumeNode):
            sliceNode.RotateToVolumePlane(volumeNode)

    def _ensureRedView(self) -> None:
        """A layout without a Red view (3D only) becomes the comparison's side-by-side one."""
        if self.redSliceNode() is None:
            slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)

    def showInRed(self, volumeNode, k) -> None:
        """The Red view shows ``volumeNode`` in its axial planes (its own when tilted), at slice K."""
        self._ensureRedView()
        composite = self._compositeNode("Red")
        composite.SetBackgroundVolumeID(volumeNode.GetID())
        composite.SetForegroundVolumeID(None)
        self._showAxialPlanes(self.redSliceNode(), volumeNode)
        slicer.app.layoutManager().sliceWidget("Red").sliceLogic().FitSliceToAll()
        self.setRedSliceIndex(volumeNode, k)

    def setFlicker(self, inputNode, outputNode, showOutput) -> None:
        """Red view: input as background, output as foreground at opacity 0 or 1 (None: restore,
        keeping the background if ``inputNode`` is None)."""
        self._ensureRedView()
        composite = self._compositeNode("Red")
        if inputNode is not None:
            composite.SetBackgroundVolumeID(inputNode.GetID())
        if showOutput is None:
            composite.SetForegroundVolumeID(None)
            composite.SetForegroundOpacity(0.0)
            return
        composite.SetForegroundVolumeID(outputNode.GetID())
        composite.SetForegroundOpacity(1.0 if showOutput else 0.0)

    def redSliceIndex(self, volumeNode, axis=None) -> Optional[int]:
        """Index K (along IJK ``axis``; default: the axial one) of the volume slice at the centre
        of the Red view; None when there is no Red view or it is centred off the volume (a slice
        at the volume's edge would be one that no view shows)."""
        sliceNode = self.redSliceNode()
        if sliceNode is None or volumeNode is None or volumeNode.GetImageData() is None:
            return None
        if axis is None:
            axis = self.axialAxis(volumeNode)
        sliceToRAS = sliceNode.GetSliceToRAS()
        ras = self.worldToLocal(volumeNode, [sliceToRAS.GetElement(i, 3) for i in range(3)]) + [1.0]
        rasToIJK = vtk.vtkMatrix4x4()
        volumeNode.GetRASToIJKMatrix(rasToIJK)
        ijk = rasToIJK.MultiplyPoint(ras)
        nSlices = volumeNode.GetImageData().GetDimensions()[axis]
        k = int(round(ijk[axis]))
        return k if 0 <= k < nSlices else None

    def measuredSlice(self, volumeNode, sliceIndex=None) -> int:
        """The axial slice a readout is about (along :meth:`axialAxis`): ``sliceIndex``, else the
        Red view's, else the middle one."""
        if sliceIndex is not None:
            return sliceIndex
        k = self.redSliceIndex(volumeNode)
        return volumeNode.GetImageData().GetDimensions()[self.axialAxis(volumeNode)] // 2 if k is None else k

    def setRedSliceIndex(self, volumeNode, k) -> None:
        """Move the Red view to the centre of axial slice K of the volume (along :meth:`axialAxis`)."""
        sliceNode = self.redSliceNode()
        if sliceNode is None:
            return
        dims = volumeNode.GetImageData().GetDimensions()
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        point = [(d - 1) / 2.0 for d in dims] + [1.0]
        point[self.axialAxis(volumeNode)] = float(k)
        ras = ijkToRAS.MultiplyPoint(point)
        sliceNode.JumpSliceByCentering(*self.worldToLocal(volumeNode, ras[:3], inverse=True))

    @staticmethod
    def worldToLocal(volumeNode, point, inverse=False) -> list:
        """A world RAS point (views, ROIs) in the volume's own RAS, under its parent transform
        (``inverse``: a point of the volume's own RAS in the world, where the views show it)."""
        point = [float(v) for v in point]
        transformNode = volumeNode.GetParentTransformNode()
        if transformNode is None:
            return point
        transform = transformNode.GetTransformToWorld() if inverse else transformNode.GetTransformFromWorld()
        return list(transform.TransformPoint(point))

    def resultOf(self, inputNode):
        """The scene's latest whole CoreDiff result of ``inputNode`` (not a one-slice preview), or None."""
        results = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                   if node.GetNodeReferenceID(self.SOURCE_REFERENCE) == inputNode.GetID()
                   and node.GetAttribute("CoreDiff.slices") is None]  # a preview's provenance names its slice
        return results[-1] if results else None

    @staticmethod
    def gridMismatch(node, inputNode) -> Optional[str]:
        """Why ``node``'s voxels do not lie on ``inputNode``'s (size, IJK-to-RAS or parent
        transform differ), or None: a readout pairs voxels by index, so a volume of another scan,
        a one-slice preview or a copy moved by a transform would give numbers about nothing."""
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        inputNode.GetIJKToRASMatrix(a)
        node.GetIJKToRASMatrix(b)
        dims = tuple(inputNode.GetImageData().GetDimensions())
        other = tuple(node.GetImageData().GetDimensions()) if node.GetImageData() is not None else (0, 0, 0)
        if other != dims or not all(abs(a.GetElement(r, c) - b.GetElement(r, c)) < 1e-3
                                    for r in range(3) for c in range(4)):
            return (f"'{node.GetName()}' ({'x'.join(map(str, other))}) is not on the voxel grid of "
                    f"'{inputNode.GetName()}' ({'x'.join(map(str, dims))})")
        if node.GetTransformNodeID() != inputNode.GetTransformNodeID():
            return (f"'{node.GetName()}' and '{inputNode.GetName()}' are under different transforms: "
                    "put both under the same one, or harden them")
        return None

    def oneSliceOf(self, volumeNode, oneNode, toleranceMm=0.5) -> Optional[int]:
        """Which axial slice of ``volumeNode`` the one-slice ``oneNode`` is (a paired one-shot
        reference given alone), as the library finds it (``CoreDiffLib.io.slice_of``): the same
        in-plane grid, directions and transform, and a position within ``toleranceMm``."""
        if volumeNode is None or oneNode is None or oneNode.GetImageData() is None \
                or volumeNode.GetImageData() is None or self.axialAxis(volumeNode) != 2 \
                or oneNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
            return None
        dims, one = volumeNode.GetImageData().GetDimensions(), oneNode.GetImageData().GetDimensions()
        if tuple(one) != (dims[0], dims[1], 1):
            return None
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(a)
        oneNode.GetIJKToRASMatrix(b)
        ma, mb = slicer.util.arrayFromVTKMatrix(a), slicer.util.arrayFromVTKMatrix(b)
        if not np.allclose(ma[:3, :2], mb[:3, :2], rtol=1e-3, atol=1e-4):
            return None
        from CoreDiffLib.orientation import slice_at
        return slice_at(ma[:3, 3][None] + np.outer(np.arange(dims[2]), ma[:3, 2]), mb[:3, 3], toleranceMm)

    def _checkOutputGrid(self, outputNode, inputNode) -> None:
        """Refuse a readout of an output that is not on the input's grid (:meth:`gridMismatch`)."""
        problem = self.gridMismatch(outputNode, inputNode)
        if problem:
            raise ValueError(f"{problem}: select this scan's denoised volume as the output (a preview holds "
                             "one slice), or Denoise it.")

    def roiStatistics(self, inputNode, outputNode, roiNode=None, sliceIndex=None) -> dict:
        """Mean and SD (HU) inside the ROI, before and after.

        With no ROI node: a box of 1/5 of the in-plane size at the centre of the current Red slice.
        The output must lie on the input's voxel grid (the denoised volume of this scan).
        """
        self._checkOutputGrid(outputNode, inputNode)
        before = slicer.util.arrayFromVolume(inputNode)
        after = slicer.util.arrayFromVolume(outputNode)
        nk, nj, ni = before.shape
        if roiNode is not None:
            size = [0.0, 0.0, 0.0]
            roiNode.GetSize(size)
            if not all(s > 0 for s in size):  # "Create new ROI" makes one unplaced, of no size
                raise ValueError(f"The ROI '{roiNode.GetName()}' has no size yet: place it in a slice view "
                                 "(click and drag), or pick another one.")
            bounds = [0.0] * 6
            roiNode.GetRASBounds(bounds)
            rasToIJK = vtk.vtkMatrix4x4()
            inputNode.GetRASToIJKMatrix(rasToIJK)
            corners = []
            for x in bounds[0:2]:
                for y in bounds[2:4]:
                    for z in bounds[4:6]:
                        corners.append(rasToIJK.MultiplyPoint(self.worldToLocal(inputNode, [x, y, z]) + [1.0])[:3])
            corners = np.array(corners)
            lo = np.clip(np.ceil(corners.min(axis=0) - 1e-6).astype(int), 0, [ni - 1, nj - 1, nk - 1])
            hi = np.clip(np.floor(corners.max(axis=0) + 1e-6).astype(int), 0, [ni - 1, nj - 1, nk - 1])
            if np.any(corners.max(axis=0) < 0) or np.any(corners.min(axis=0) > [ni - 1, nj - 1, nk - 1]):
                raise ValueError("The ROI is outside the volume.")
            inside = self._voxelsInROI(inputNode, roiNode, lo, hi)
            where = f"ROI '{roiNode.GetName()}'"
        else:  # a box at the centre of the axial plane, across the axial axis
            axis, k = self.axialAxis(inputNode), self.measuredSlice(inputNode, sliceIndex)
            size = np.array([ni, nj, nk])
            half = np.maximum(size // 10, 1)
            lo, hi = size // 2 - half, size // 2 + half - 1
            lo[axis] = hi[axis] = k
            inside = None
            where = f"central box on slice {k}"
        sl = (slice(lo[2], hi[2] + 1), slice(lo[1], hi[1] + 1), slice(lo[0], hi[0] + 1))
        b = before[sl].astype(np.float64)
        a = after[sl].astype(np.float64)
        if inside is not None:  # the box around a tilted ROI holds voxels outside it
            b, a = b[inside], a[inside]
        if b.size == 0:
            raise ValueError("The ROI contains no voxel.")
        return {"before": {"mean": float(b.mean()), "std": float(b.std())},
                "after": {"mean": float(a.mean()), "std": float(a.std())},
                "voxels": int(b.size), "where": where,
                "ijkMin": [int(v) for v in lo], "ijkMax": [int(v) for v in hi]}


    def _voxelsInROI(self, volumeNode, roiNode, lo, hi) -> np.ndarray:
        """(K, J, I) mask of the voxels from IJK ``lo`` to ``hi`` whose centres lie in the ROI box:
        a volume or an ROI at an angle to the other covers voxels outside it in its IJK box.
        One plane at a time, in one matrix when the volume's transform is linear (memory and time
        of a plane, not of the box)."""
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        toRAS = slicer.util.arrayFromVTKMatrix(ijkToRAS)
        worldToObject = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(roiNode.GetObjectToWorldMatrix(), worldToObject)
        toObject = slicer.util.arrayFromVTKMatrix(worldToObject)
        transformNode = volumeNode.GetParentTransformNode()
        warped = transformNode is not None and not transformNode.IsTransformToWorldLinear()
        if transformNode is not None and not warped:  # the ROI is placed in the world
            toWorld = vtk.vtkMatrix4x4()
            transformNode.GetMatrixTransformToWorld(toWorld)
            toObject = toObject @ slicer.util.arrayFromVTKMatrix(toWorld)
        size = [0.0, 0.0, 0.0]
        roiNode.GetSize(size)
        half = np.asarray(size)[:, None] / 2.0 + 1e-6
        jj, ii = np.mgrid[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
        mask = np.zeros((hi[2] - lo[2] + 1,) + jj.shape, bool)
        for plane, k in enumerate(range(lo[2], hi[2] + 1)):
            ras = toRAS @ np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k), np.ones(ii.size)])
            if warped:  # a non-linear transform: point by point
                ras[:3] = np.array([self.worldToLocal(volumeNode, p, inverse=True) for p in ras[:3].T]).T
            local = (toObject @ ras)[:3]
            mask[plane] = (np.abs(local) <= half).all(axis=0).reshape(jj.shape)
        return mask

    def sliceQuality(self, inputNode, outputNode, referenceNode, sliceIndex=None) -> dict:
        """PSNR / SSIM / RMSE of input and result against a reference scan, on one slice
        (default: the Red view's), computed by ``CoreDiffLib.metrics`` as the paper reports them.

        The reference must share the input's voxel grid and transform: metrics of misaligned voxels
        mean nothing.
        """
        from CoreDiffLib.metrics import slice_metrics
        self._checkOutputGrid(outputNode, inputNode)
        problem = self.gridMismatch(referenceNode, inputNode)
        if problem:
            raise ValueError(f"The reference {problem}: resample it onto the input first "
                             "(Resample Scalar/Vector/DWI Volume, or Resample Image (BRAINS) with its transform).")
        before = slicer.util.arrayFromVolume(inputNode)
        after = slicer.util.arrayFromVolume(outputNode)
        reference = slicer.util.arrayFromVolume(referenceNode)
        axis, k = self.axialAxis(inputNode), self.measuredSlice(inputNode, sliceIndex)

        def plane(array):
            return self.axialPlane(array, axis, k)
        return {"slice": k, "reference": referenceNode.GetName(),
                "input": slice_metrics(plane(before), plane(reference)),
                "output": slice_metrics(plane(after), plane(reference))}


#
# CoreDiffSlicerTest
#

class CoreDiffSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest ``py_CoreDiffSlicer`` or the Reload & Test button)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def needPyTorch(self) -> None:
        """Skip a denoising test where PyTorch is missing. ctest (``slicer.testing.runUnitTest``)
        runs each ``test_`` method on its own, not :meth:`runTest`, whose check alone let them fail
        on Slicer's extension test machines."""
        if not CoreDiffSlicerLogic().checkDependencies(interactive=False):
            self.skipTest("PyTorch or CoreDiff's Python packages are not installed here")

    def runTest(self):
        self.setUp()
        self.test_CoreDiffSlicer_without_pytorch()  # runs everywhere, Slicer's test machines too
        self.setUp()
        if not CoreDiffSlicerLogic().checkDependencies(interactive=False):
            # a machine without PyTorch (Slicer's extension test machines) can load the module,
            # not denoise: say so, rather than fail on what the user would be asked to install
            self.delayDisplay("PyTorch or CoreDiff's Python packages are not installed here: the denoising tests "
                              "are skipped (open the module and install them, then run this test again)")
            return
        self.test_CoreDiffSlicer_denoise_geometry_and_noise()
        self.setUp()
        self.test_CoreDiffSlicer_preview()
        self.setUp()
        self.test_CoreDiffSlicer_cancel()
        self.setUp()
        self.test_CoreDiffSlicer_input_removed_during_run()

    @staticmethod
    def makeNoisyCylinder(name="CoreDiffTestVolume", shape=(8, 96, 96), noiseSD=40.0, seed=0):
        """A water cylinder (0 HU) in air (-1000 HU) with a 60 HU insert, plus noise, in a volume
        with non-trivial geometry (anisotropic spacing, oblique direction, offset origin)."""
        rng = np.random.default_rng(seed)
        nk, nj, ni = shape
        j, i = np.mgrid[0:nj, 0:ni]
        r = np.hypot(i - ni / 2, j - nj / 2)
        sliceImage = np.where(r < ni * 0.42, 0.0, -1000.0)
        sliceImage[np.hypot(i - ni * 0.62, j - nj / 2) < ni * 0.08] = 60.0
        volume = np.repeat(sliceImage[None], nk, axis=0) + rng.normal(0, noiseSD, (nk, nj, ni))
        ijkToRAS = vtk.vtkMatrix4x4()
        angle = np.deg2rad(10.0)
        spacing = (0.7, 0.7, 2.5)
        rotation = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
        for row in range(3):
            for col in range(3):
                ijkToRAS.SetElement(row, col, rotation[row][col] * spacing[col])
        for row, value in enumerate((-33.0, 12.5, -140.0)):
            ijkToRAS.SetElement(row, 3, value)
        return slicer.util.addVolumeFromArray(volume.astype(np.int16), ijkToRAS, name)

    def test_CoreDiffSlicer_without_pytorch(self):
        """What needs no PyTorch: the geometry handed to the library, the axial planes, the model
        arguments, messages in the module's words and the readout's text."""
        self.delayDisplay("Checking the module's geometry, arguments and messages")
        inputNode = self.makeNoisyCylinder()
        logic = CoreDiffSlicerLogic()
        spacing, origin, direction = logic.lpsGeometry(inputNode)
        np.testing.assert_allclose(spacing, (0.7, 0.7, 2.5))
        np.testing.assert_allclose(origin, (33.0, -12.5, -140.0))  # RAS (-33, 12.5) in LPS
        np.testing.assert_allclose(np.reshape(direction, (3, 3))[2], (0.0, 0.0, 1.0), atol=1e-12)
        self.assertEqual(logic.axialAxis(inputNode), 2)
        self.assertEqual(logic.modelArguments("model:corediff-25"), ["--model", "corediff-25"])
        self.assertEqual(logic.modelArguments("adaptation:mine"), ["--adaptation", "mine"])
        self.assertEqual(logic.modelArguments("adaptation:mine", withAdaptation=False), [])
        self.assertEqual(logic.modelArguments("", modelFile="/m/own.safetensors"), ["--model", "/m/own.safetensors"])
        header = json.dumps({"__metadata__": {"config": json.dumps({"steps": 20})}}).encode()
        ownModel = os.path.join(slicer.app.temporaryPath, "CoreDiffSelfTest-t20.safetensors")
        with open(ownModel, "wb") as f:  # the header the steps slider reads its top from
            f.write(len(header).to_bytes(8, "little") + header)
        self.assertEqual(logic.modelFileSteps(ownModel), 20)
        os.remove(ownModel)
        self.assertEqual(logic.guiMessage("/run/input.nrrd: choose one with --model", {"/run/input.nrrd": "CT"}),
                         "'CT': choose one in the Model list")
        stats = {"voxels": 9, "where": "slice 0", "before": {"mean": 0.0, "std": 10.0},
                 "after": {"mean": 0.0, "std": 12.0}}
        self.assertIn("Noise (SD) increased by 20 %", formatRoiStatistics(stats))
        self.delayDisplay("Test passed")

    def test_CoreDiffSlicer_denoise_geometry_and_noise(self):
        self.needPyTorch()
        self.delayDisplay("Denoising a noisy cylinder")
        inputNode = self.makeNoisyCylinder()
        inputBefore = slicer.util.arrayFromVolume(inputNode).copy()
        logic = CoreDiffSlicerLogic()
        outputNode = logic.denoise(inputNode, timeout=3600)  # --steps auto: all T on a GPU, one on a CPU

        self.assertNotEqual(outputNode.GetID(), inputNode.GetID())
        self.assertTrue(outputNode.GetAttribute("CoreDiff.model"))  # what made it travels with the node
        self.assertRegex(outputNode.GetAttribute("CoreDiff.steps") or "", r"^\d+ of \d+$")
        self.assertEqual(outputNode.GetAttribute("CoreDiff.context"), "adjacent slices")  # 2.5 mm apart
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        inputNode.GetIJKToRASMatrix(a)
        outputNode.GetIJKToRASMatrix(b)
        for row in range(4):
            for col in range(4):
                self.assertAlmostEqual(a.GetElement(row, col), b.GetElement(row, col), places=9)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(inputNode), inputBefore)

        stats = logic.roiStatistics(inputNode, outputNode, sliceIndex=4)
        self.delayDisplay(formatRoiStatistics(stats))
        self.assertLess(stats["after"]["std"], stats["before"]["std"])
        self.assertLess(abs(stats["after"]["mean"] - stats["before"]["mean"]), 20.0)
        logic.showComparison(inputNode, outputNode)
        self.delayDisplay("Test passed")

    def test_CoreDiffSlicer_preview(self):
        self.needPyTorch()
        self.delayDisplay("Previewing one slice")
        inputNode = self.makeNoisyCylinder()
        logic = CoreDiffSlicerLogic()
        preview = logic.denoise(inputNode, timeout=3600, sliceIndex=3)
        full = logic.denoise(inputNode, timeout=3600)
        self.assertTrue(preview.GetName().endswith("preview"))
        self.assertEqual(slicer.util.arrayFromVolume(preview).shape, (1, 96, 96))
        # slice 3 as the whole run denoises it (same neighbours), where slice 3 lies
        np.testing.assert_allclose(slicer.util.arrayFromVolume(preview)[0], slicer.util.arrayFromVolume(full)[3],
                                   atol=1.0)
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        inputNode.GetIJKToRASMatrix(a)
        preview.GetIJKToRASMatrix(b)
        sliceOrigin = a.MultiplyPoint([0.0, 0.0, 3.0, 1.0])
        for row in range(3):
            self.assertAlmostEqual(b.GetElement(row, 3), sliceOrigin[row], places=6)
            for col in range(3):
                self.assertAlmostEqual(b.GetElement(row, col), a.GetElement(row, col), places=9)
        # the slice as its own context (as for thick slices): another result, and the node says so
        own = logic.denoise(inputNode, timeout=3600, sliceIndex=3, context="own")
        self.assertEqual(own.GetAttribute("CoreDiff.context"), "each slice itself")
        self.assertFalse(np.array_equal(slicer.util.arrayFromVolume(own), slicer.util.arrayFromVolume(preview)))
        self.delayDisplay("Test passed")

    def test_CoreDiffSlicer_cancel(self):
        self.needPyTorch()
        self.delayDisplay("Cancelling a run")
        inputNode = self.makeNoisyCylinder(shape=(64, 256, 256))
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        logic = CoreDiffSlicerLogic()
        outcome = {}
        job = logic.startDenoise(inputNode, steps=None, batchSize=1, onFinished=lambda j, n, m: outcome.update(node=n))
        deadline = time.time() + 120
        while job.done == 0 and not job.finished and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertFalse(job.finished, job.errorMessage)  # still running: cancel it mid-run
        logic.cancel(job)
        self.assertTrue(job.finished)
        self.assertIsNone(outcome.get("node"))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.assertFalse(os.path.exists(job.runDir))
        self.delayDisplay("Test passed")

    def test_CoreDiffSlicer_input_removed_during_run(self):
        self.needPyTorch()
        self.delayDisplay("Removing the input while it is denoised")
        inputNode = self.makeNoisyCylinder()
        logic = CoreDiffSlicerLogic()
        outcome = {}
        job = logic.startDenoise(inputNode, onFinished=lambda j, n, m: outcome.update(node=n, message=m))
        slicer.mrmlScene.RemoveNode(inputNode)
        nodesAfterRemoval = slicer.mrmlScene.GetNumberOfNodes()
        job.wait(3600)
        self.assertIsNone(outcome.get("node"))
        self.assertIn("removed from the scene during the run", outcome.get("message") or "")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesAfterRemoval)
        self.assertFalse(os.path.exists(job.runDir))
        self.delayDisplay("Test passed")
