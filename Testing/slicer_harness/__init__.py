"""A stand-in for the part of 3D Slicer's Python API that CoreDiffSlicer uses.

``install(tempDir)`` registers the modules ``qt``, ``ctk``, ``slicer`` (with ``slicer.util``,
``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``) and ``PyTorchUtils`` in
``sys.modules``; ``loadModule()`` then imports CoreDiffSlicer/CoreDiffSlicer.py as Slicer does.

Faithfulness rules:
- real VTK objects (vtkImageData, vtkMatrix4x4, vtkObject observers), real PySide6 widgets and
  a real subprocess (``launchConsoleProcess`` = Slicer's Popen call);
- the module is executed with PySide6's ``true_property`` feature so Qt properties read and write
  as attributes, like PythonQt (``button.enabled = False``); getter methods named like a property
  (``text()``) do not exist there, as in Slicer;
- only the API listed here exists: no MagicMock, no catch-all ``__getattr__``; an unexpected call
  raises AttributeError.
"""

import importlib.util
import logging
import os
import subprocess
import sys
import types
import unittest
import xml.etree.ElementTree as ET

import numpy as np
import vtk
import vtk.util.numpy_support as numpy_support
from PySide6 import QtCore, QtGui, QtWidgets
from PySide6.QtUiTools import QUiLoader

from . import mrml, pnw, qtwidgets

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE_PATH = os.path.join(REPO_ROOT, "CoreDiffSlicer", "CoreDiffSlicer.py")

# Records of what the module showed or launched, for tests to inspect.
displayed = []  # (kind, text)
launched = []  # subprocess.Popen objects
confirmAnswer = {"value": False}


# ---------------------------------------------------------------- qt / ctk

def _makeQtModule():
    """``qt``: PythonQt exposes QtCore, QtGui and QtWidgets classes in one namespace."""
    qt = types.ModuleType("qt")
    for source in (QtCore, QtGui, QtWidgets):
        for name in dir(source):
            if not name.startswith("_"):
                setattr(qt, name, getattr(source, name))
    return qt


def _makeCtkModule():
    ctk = types.ModuleType("ctk")
    for cls in (qtwidgets.ctkComboBox, qtwidgets.ctkCollapsibleButton, qtwidgets.ctkSliderWidget,
                qtwidgets.ctkPathLineEdit):
        setattr(ctk, cls.__name__, cls)
    return ctk


# ---------------------------------------------------------------- slicer.util

def loadUI(path):
    """Mirrors slicer.util.loadUI: QUiLoader with the MRML/CTK widgets registered.

    The .ui <connections> use C++ signatures (``mrmlSceneChanged(vtkMRMLScene*)``); they are wired
    here by name, and a missing sender/receiver/signal/slot raises (Slicer would log and the
    combo boxes would stay empty)."""
    tree = ET.parse(path)
    root = tree.getroot()
    connections = root.find("connections")
    wiring = []
    if connections is not None:
        for c in connections.findall("connection"):
            wiring.append(tuple(c.find(tag).text for tag in ("sender", "signal", "receiver", "slot")))
        root.remove(connections)
    data = QtCore.QByteArray(ET.tostring(root, encoding="utf-8"))
    loader = QUiLoader()
    for cls in qtwidgets.CUSTOM_WIDGETS:
        loader.registerCustomWidget(cls)
    buffer = QtCore.QBuffer(data)
    buffer.open(QtCore.QIODevice.ReadOnly)
    widget = loader.load(buffer)
    if widget is None:
        raise RuntimeError(f"loadUI failed: {loader.errorString()}")
    byName = {w.objectName(): w for w in [widget] + widget.findChildren(QtCore.QObject)}
    for sender, signal, receiver, slot in wiring:
        s, r = byName[sender], byName[receiver]
        getattr(s, signal.split("(")[0]).connect(getattr(r, slot.split("(")[0]))
    return widget


def childWidgetVariables(widget):
    """Mirrors slicer.util.childWidgetVariables: a namespace of all named descendants."""
    ui = types.SimpleNamespace()
    for child in widget.findChildren(QtCore.QObject):
        if child.objectName():
            setattr(ui, child.objectName(), child)
    return ui


def arrayFromVolume(volumeNode):
    """Mirrors slicer.util.arrayFromVolume: a numpy VIEW (K, J, I) of the vtkImageData scalars."""
    imageData = volumeNode.GetImageData()
    shape = tuple(reversed(imageData.GetDimensions()))
    components = imageData.GetNumberOfScalarComponents()
    if components > 1:
        shape = shape + (components,)
    return numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(shape)


def updateVolumeFromArray(volumeNode, narray):
    """Mirrors slicer.util.updateVolumeFromArray: new vtkImageData (spacing 1, origin 0) with a
    copy of the array; geometry stays in the node."""
    vshape = tuple(reversed(narray.shape))
    if len(vshape) != 3:
        raise RuntimeError("Unsupported numpy array shape: " + str(narray.shape))
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(vshape)
    vtype = numpy_support.get_vtk_array_type(narray.dtype)
    imageData.AllocateScalars(vtype, 1)
    target = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(narray.shape)
    target[:] = narray
    volumeNode.SetAndObserveImageData(imageData)


def arrayFromVTKMatrix(vmatrix):
    """Mirrors slicer.util.arrayFromVTKMatrix: a vtkMatrix4x4 as a (4, 4) numpy array (a copy)."""
    return np.array([[vmatrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def getNodesByClass(className, scene=None):
    """Mirrors slicer.util.getNodesByClass: a list of the scene's nodes of that class or a subclass."""
    scene = scene or _slicer.mrmlScene
    return [node for node in scene._nodes if node.IsA(className)]


def addVolumeFromArray(narray, ijkToRAS=None, name=None, nodeClassName=None):
    """Mirrors slicer.util.addVolumeFromArray."""
    volumeNode = _slicer.mrmlScene.AddNewNodeByClass(nodeClassName or "vtkMRMLScalarVolumeNode", name or "")
    if ijkToRAS is not None:
        volumeNode.SetIJKToRASMatrix(ijkToRAS)
    volumeNode.CreateDefaultDisplayNodes()
    updateVolumeFromArray(volumeNode, narray)
    return volumeNode


def tempDirectory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):
    """Mirrors slicer.util.tempDirectory: creates <temporaryPath>/<key><date-time>."""
    base = tempDir or _slicer.app.temporaryPath
    name = key
    if includeDateTime:
        name += QtCore.QDateTime.currentDateTime().toString("yyyy-MM-dd_hh+mm+ss.zzz")
    path = os.path.join(base, name)
    os.makedirs(path, exist_ok=True)
    return path


_startupEnvironment = dict(os.environ)


def startupEnvironment():
    return dict(_startupEnvironment)


def launchConsoleProcess(args, useStartupEnvironment=True, updateEnvironment=None, cwd=None):
    """Mirrors slicer.util.launchConsoleProcess (POSIX branch): stdout and stderr merged, text mode."""
    if useStartupEnvironment:
        env = startupEnvironment()
        if updateEnvironment:
            env.update(updateEnvironment)
    elif updateEnvironment:
        env = dict(os.environ)
        env.update(updateEnvironment)
    else:
        env = None
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, cwd=cwd)
    launched.append(proc)
    return proc


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    logging.error(text)
    displayed.append(("error", text))


def infoDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    displayed.append(("info", text))


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    displayed.append(("confirm", text))
    return confirmAnswer["value"]


def pip_install(requirements):
    raise AssertionError(f"harness: pip_install({requirements!r}) called; tests must not install packages")


class NodeModify:
    """Mirrors slicer.util.NodeModify context manager."""

    def __init__(self, node):
        self.node = node

    def __enter__(self):
        self.wasModifying = self.node.StartModify()
        return self.node

    def __exit__(self, *exc):
        self.node.EndModify(self.wasModifying)


class VTKObservationMixin:
    """Mirrors slicer.util.VTKObservationMixin."""

    def __init__(self):
        super().__init__()
        self.Observations = []

    def removeObservers(self, method=None):
        for observation in list(self.Observations):
            obj, event, m, group, tag, priority = observation
            if method == m or method is None:
                obj.RemoveObserver(tag)
                self.Observations.remove(observation)

    def addObserver(self, obj, event, method, group="none", priority=0.0):
        for o, e, m, g, t, p in self.Observations:
            if o == obj and e == event and m == method:
                logging.warning("already has observer")
                return
        tag = obj.AddObserver(event, method, priority)
        self.Observations.append([obj, event, method, group, tag, priority])

    def removeObserver(self, obj, event, method):
        for observation in list(self.Observations):
            o, e, m, g, t, p = observation
            if o == obj and e == event and m == method:
                o.RemoveObserver(t)
                self.Observations.remove(observation)

    def hasObserver(self, obj, event, method):
        return any(o == obj and e == event and m == method for o, e, m, g, t, p in self.Observations)


# ---------------------------------------------------------------- slicer.ScriptedLoadableModule

class _ModuleParent:
    """Mirrors the qSlicerScriptedLoadableModule attributes a module sets in __init__."""
    __slots__ = ("title", "categories", "dependencies", "contributors", "helpText",
                 "acknowledgementText", "hidden", "icon")


class qSlicerScriptedLoadableModuleWidget(qtwidgets.qMRMLWidget):
    """Mirrors the widget Slicer passes as ``parent`` to a module widget (isEntered property)."""

    def __init__(self):
        super().__init__()
        self.setLayout(QtWidgets.QVBoxLayout())
        self.isEntered = False


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Widget"):
            self.moduleName = self.moduleName[:-6]
        if not parent:
            self.parent = qSlicerScriptedLoadableModuleWidget()
        else:
            self.parent = parent
        self.layout = self.parent.layout()
        if not parent:
            self.setup()
            self.parent.show()

    def resourcePath(self, filename):
        moduleDir = os.path.dirname(sys.modules[type(self).__module__].__file__)
        return os.path.join(moduleDir, "Resources", filename)

    def setup(self):
        pass  # developer-mode reload/test buttons are not mirrored

    def cleanup(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[:-5]
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        if self.isSingletonParameterNode:
            node = _slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node:
                return node
        node = self.createParameterNode()
        return _slicer.mrmlScene.AddNode(node)

    def createParameterNode(self):
        node = _slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.SetName(_slicer.mrmlScene.GetUniqueNameByString(self.moduleName))
        if self.isSingletonParameterNode:
            node.SetSingletonTag(self.moduleName)
        node.SetModuleName(self.moduleName)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, requestedDelay=None, msec=None):
        logging.info(message)
        QtWidgets.QApplication.processEvents()


# ---------------------------------------------------------------- slicer.app

class _App:
    """Mirrors the slicer.app members used: layoutManager(), processEvents(), temporaryPath."""

    def __init__(self, scene, temporaryPath):
        self._layoutManager = mrml.LayoutManager(scene)
        self.temporaryPath = temporaryPath

    def layoutManager(self):
        return self._layoutManager

    def processEvents(self):
        QtWidgets.QApplication.processEvents()


# ---------------------------------------------------------------- PyTorchUtils

class _PyTorchUtilsLogic:
    """Mirrors PyTorchUtils.PyTorchUtilsLogic (SlicerPyTorch) torchInstalled/installTorch."""

    @staticmethod
    def torchInstalled():
        return importlib.util.find_spec("torch") is not None

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        raise AssertionError("harness: installTorch called; torch is installed in the test environment")


_slicer = None


def install(temporaryPath):
    """Register the stand-in modules and return the ``slicer`` module."""
    global _slicer
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    displayed.clear()
    confirmAnswer["value"] = False

    slicer = types.ModuleType("slicer")
    util = types.ModuleType("slicer.util")
    for f in (loadUI, childWidgetVariables, arrayFromVolume, updateVolumeFromArray, addVolumeFromArray, getNodesByClass,
              arrayFromVTKMatrix,
              tempDirectory, startupEnvironment, launchConsoleProcess, errorDisplay, infoDisplay,
              confirmOkCancelDisplay, pip_install, NodeModify, VTKObservationMixin):
        setattr(util, f.__name__, f)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for c in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
              ScriptedLoadableModuleTest):
        setattr(slm, c.__name__, c)
    pnwModule = types.ModuleType("slicer.parameterNodeWrapper")
    for name in ("parameterNodeWrapper", "isParameterNodeWrapper", "GuiConnector", "parameterNodeGuiConnector",
                 "createGuiConnector", "WithinRange", "Minimum", "Maximum", "Choice", "NotNone", "IsInstance",
                 "Decimals", "SingleStep", "splitAnnotations", "unannotatedType", "findFirstAnnotation",
                 "SlicerParameterNamePropertyName"):
        setattr(pnwModule, name, getattr(pnw, name))

    for name in ("vtkMRMLNode", "vtkMRMLScene", "vtkMRMLScriptedModuleNode", "vtkMRMLVolumeNode",
                 "vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode", "vtkMRMLScalarVolumeDisplayNode",
                 "vtkMRMLMarkupsROINode", "vtkMRMLSliceCompositeNode", "vtkMRMLSliceNode", "vtkMRMLLayoutNode",
                 "vtkMRMLSubjectHierarchyNode"):
        setattr(slicer, name, getattr(mrml, name))
    slicer.qMRMLNodeComboBox = qtwidgets.qMRMLNodeComboBox
    slicer.qMRMLWidget = qtwidgets.qMRMLWidget
    slicer.util = util
    slicer.ScriptedLoadableModule = slm
    slicer.parameterNodeWrapper = pnwModule
    slicer.mrmlScene = mrml.vtkMRMLScene()
    slicer.app = _App(slicer.mrmlScene, temporaryPath)

    pyTorchUtils = types.ModuleType("PyTorchUtils")
    pyTorchUtils.PyTorchUtilsLogic = _PyTorchUtilsLogic

    sys.modules.update({
        "qt": _makeQtModule(), "ctk": _makeCtkModule(), "slicer": slicer, "slicer.util": util,
        "slicer.ScriptedLoadableModule": slm, "slicer.parameterNodeWrapper": pnwModule,
        "PyTorchUtils": pyTorchUtils,
    })
    # connectors registered by a previously loaded module copy would reference stale classes
    pnw._registeredGuiConnectors[:] = [c for c in pnw._registeredGuiConnectors
                                       if c.__module__ == pnw.__name__]
    _slicer = slicer
    return slicer


def loadModule(path=MODULE_PATH, name="CoreDiffSlicer"):
    """Import the scripted module like Slicer does, with PythonQt-like property access."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # PySide's feature machinery inspects loaded modules with inspect.getsource(); torch.classes
    # answers any attribute with RuntimeError, which breaks it: hide it for that moment.
    hidden = {k: sys.modules.pop(k) for k in [k for k in sys.modules if k == "torch.classes"]}
    try:
        exec("from __feature__ import true_property", module.__dict__)
    finally:
        sys.modules.update(hidden)
    spec.loader.exec_module(module)
    return module


def moduleWidgetParent():
    return qSlicerScriptedLoadableModuleWidget()


def moduleParent():
    return _ModuleParent()


def volumeFromArray(array, ijkToRAS, name):
    """Test helper: add a volume node like loading a file would."""
    return addVolumeFromArray(np.ascontiguousarray(array), ijkToRAS, name)
