"""Stand-in for ``slicer.parameterNodeWrapper`` (Base/Python/slicer/parameterNodeWrapper/).

Mirrors the semantics CoreDiffSlicer relies on:
- ``@parameterNodeWrapper`` turns annotated class members into typed properties stored in a
  vtkMRMLScriptedModuleNode (numbers/str/bool/Path as string parameters, nodes as node references),
  validated on write (NotNone + IsInstance by type, plus WithinRange/Choice... annotations);
- ``connectGui(gui)`` binds every widget whose dynamic property ``SlicerParameterName`` names a
  parameter, choosing a GuiConnector from the registry in registration order; the first connector
  whose ``canRepresent`` accepts the (widget, type) pair is used, and no match is a RuntimeError;
- built-in connectors compare ``type(widget)`` exactly, as Slicer's do.
"""

import abc
import pathlib
import typing

import vtk
from PySide6 import QtCore, QtWidgets

SlicerParameterNamePropertyName = "SlicerParameterName"


# ---- annotations / validators (validators.py) ----

class Validator(abc.ABC):
    @abc.abstractmethod
    def validate(self, value):
        raise NotImplementedError


class NotNone(Validator):
    def validate(self, value):
        if value is None:
            raise ValueError("Value must not be None")


class IsInstance(Validator):
    def __init__(self, classtype):
        self.classtype = classtype

    def validate(self, value):
        if value is not None and not isinstance(value, self.classtype):
            raise TypeError(f"Value must be of type '{self.classtype}', is type '{type(value)}' value '{value}'")


class WithinRange(Validator):
    def __init__(self, minimum, maximum):
        self.minimum = minimum
        self.maximum = maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class Minimum(Validator):
    def __init__(self, minimum):
        self.minimum = minimum

    def validate(self, value):
        if value < self.minimum:
            raise ValueError(f"Value must be greater than {self.minimum}, is {value}")


class Maximum(Validator):
    def __init__(self, maximum):
        self.maximum = maximum

    def validate(self, value):
        if value > self.maximum:
            raise ValueError(f"Value must be less than {self.maximum}, is {value}")


class Choice(Validator):
    def __init__(self, choices):
        self.choices = choices

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


class Decimals:
    def __init__(self, value):
        self.value = value


class SingleStep:
    def __init__(self, value):
        self.value = value


# ---- util.py ----

def splitAnnotations(possiblyAnnotatedType):
    if typing.get_origin(possiblyAnnotatedType) is typing.Annotated:
        args = typing.get_args(possiblyAnnotatedType)
        return args[0], list(args[1:])
    return possiblyAnnotatedType, []


def unannotatedType(possiblyAnnotatedType):
    return splitAnnotations(possiblyAnnotatedType)[0]


def findFirstAnnotation(annotations, annotationType):
    for a in annotations:
        if isinstance(a, annotationType):
            return a
    return None


def _isNodeType(t):
    import slicer
    return isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode)


# ---- serializers.py ----

_PATH_TYPES = (pathlib.Path, pathlib.PosixPath, pathlib.PurePath, pathlib.PurePosixPath)


class _Serializer:
    def __init__(self, type_, validators):
        self.type = type_
        self.validators = validators

    def default(self):
        if self.type in (int, float):
            return 0
        if self.type is str:
            return ""
        if self.type is bool:
            return False
        if self.type in _PATH_TYPES:
            return self.type()
        return None

    def isIn(self, node, name):
        return node.HasParameter(name)

    def write(self, node, name, value):
        for v in self.validators:
            v.validate(value)
        if _isNodeType(self.type):
            node.SetParameter(name, "")
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        elif self.type is bool:
            node.SetParameter(name, "True" if value else "False")
        else:
            node.SetParameter(name, str(value))

    def read(self, node, name):
        if _isNodeType(self.type):
            return node.GetNodeReference(name)
        if self.type is bool:
            return node.GetParameter(name) == "True"
        return self.type(node.GetParameter(name))


def _createSerializer(nametype):
    type_, annotations = splitAnnotations(nametype)
    validators = [a for a in annotations if isinstance(a, Validator)]
    if type_ in (int, float):
        base = [NotNone(), IsInstance((int, float) if type_ is float else int)]
    elif type_ in (str, bool) or type_ in _PATH_TYPES:
        base = [NotNone(), IsInstance(type_)]
    elif _isNodeType(type_):
        base = [IsInstance(type_)]
    else:
        raise Exception(f"harness: unable to create serializer for type: {type_}")
    return _Serializer(type_, base + validators)


# ---- guiConnectors.py ----

class GuiConnector(abc.ABC):
    @staticmethod
    @abc.abstractmethod
    def canRepresent(widget, datatype) -> bool:
        raise NotImplementedError

    @staticmethod
    @abc.abstractmethod
    def create(widget, datatype):
        raise NotImplementedError

    def __init__(self):
        super().__init__()
        self._callback = None

    def onChanged(self, callback):
        self._callback = callback
        if self._callback is None:
            self._disconnect()
        else:
            self._connect()

    def changed(self, *unused):
        if self._callback:
            self._callback()

    @abc.abstractmethod
    def _connect(self):
        raise NotImplementedError

    @abc.abstractmethod
    def _disconnect(self):
        raise NotImplementedError

    @abc.abstractmethod
    def widget(self):
        raise NotImplementedError

    @abc.abstractmethod
    def read(self):
        raise NotImplementedError

    @abc.abstractmethod
    def write(self, value):
        raise NotImplementedError


_registeredGuiConnectors = []


def parameterNodeGuiConnector(classtype=None):
    def wrap(cls):
        if not issubclass(cls, GuiConnector):
            raise TypeError("Must be a GuiConnector subclass")
        _registeredGuiConnectors.append(cls)
        return cls
    return wrap if classtype is None else wrap(classtype)


def createGuiConnector(widget, datatype):
    for connectorType in _registeredGuiConnectors:
        if connectorType.canRepresent(widget, datatype):
            return connectorType.create(widget, datatype)
    raise RuntimeError(f"Unable to create GUI connector from datatype '{datatype}' to widget type '{type(widget)}'")


class _SignalConnector(GuiConnector):
    signal = None

    def __init__(self, widget):
        super().__init__()
        self._widget = widget

    def _connect(self):
        getattr(self._widget, self.signal).connect(self.changed)

    def _disconnect(self):
        getattr(self._widget, self.signal).disconnect(self.changed)

    def widget(self):
        return self._widget


@parameterNodeGuiConnector
class QCheckBoxToBoolConnector(_SignalConnector):
    signal = "stateChanged"

    @staticmethod
    def canRepresent(widget, datatype):
        return unannotatedType(datatype) == bool and type(widget) == QtWidgets.QCheckBox

    @staticmethod
    def create(widget, datatype):
        return QCheckBoxToBoolConnector(widget)

    def read(self):
        return self._widget.isChecked()

    def write(self, value):
        self._widget.setChecked(value)


@parameterNodeGuiConnector
class QCheckablePushButtonToBoolConnector(_SignalConnector):
    signal = "toggled"

    @staticmethod
    def canRepresent(widget, datatype):
        return unannotatedType(datatype) == bool and type(widget) == QtWidgets.QPushButton

    @staticmethod
    def create(widget, datatype):
        widget.setCheckable(True)
        return QCheckablePushButtonToBoolConnector(widget)

    def read(self):
        return self._widget.isChecked()

    def write(self, value):
        self._widget.setChecked(value)


def _applyRange(widget, annotations, setRange, bounded_required):
    withinRange = findFirstAnnotation(annotations, WithinRange)
    minimum = findFirstAnnotation(annotations, Minimum)
    maximum = findFirstAnnotation(annotations, Maximum)
    if bounded_required and withinRange is None and not (minimum and maximum):
        raise RuntimeError("Cannot have a connection to a slider where the type is unbounded.")
    if withinRange is not None:
        setRange(withinRange.minimum, withinRange.maximum)
    else:
        setRange(minimum.minimum if minimum else None, maximum.maximum if maximum else None)


@parameterNodeGuiConnector
class QSliderOrSpinBoxToIntConnector(_SignalConnector):
    signal = "valueChanged"

    @staticmethod
    def canRepresent(widget, datatype):
        return unannotatedType(datatype) == int and type(widget) in (QtWidgets.QSlider, QtWidgets.QSpinBox)

    @staticmethod
    def create(widget, datatype):
        connector = QSliderOrSpinBoxToIntConnector(widget)
        annotations = splitAnnotations(datatype)[1]

        def setRange(lo, hi):
            widget.setMinimum(-2**31 if lo is None else lo)
            widget.setMaximum(2**31 - 1 if hi is None else hi)
        _applyRange(widget, annotations, setRange, isinstance(widget, QtWidgets.QSlider))
        return connector

    def read(self):
        return self._widget.value()

    def write(self, value):
        self._widget.setValue(value)


@parameterNodeGuiConnector
class QDoubleSpinBoxCtkSliderWidgetToFloatConnector(_SignalConnector):
    signal = "valueChanged"

    @staticmethod
    def canRepresent(widget, datatype):
        import ctk
        return unannotatedType(datatype) == float and type(widget) in (QtWidgets.QDoubleSpinBox, ctk.ctkSliderWidget)

    @staticmethod
    def create(widget, datatype):
        import ctk
        connector = QDoubleSpinBoxCtkSliderWidgetToFloatConnector(widget)
        annotations = splitAnnotations(datatype)[1]
        isCtk = type(widget) == ctk.ctkSliderWidget

        def setRange(lo, hi):
            lo = float("-inf") if lo is None else lo
            hi = float("inf") if hi is None else hi
            if isCtk:
                widget.minimum, widget.maximum = lo, hi
            else:
                widget.setRange(lo, hi)
        _applyRange(widget, annotations, setRange, isCtk)
        return connector

    def read(self):
        import ctk
        return self._widget.value if type(self._widget) == ctk.ctkSliderWidget else self._widget.value()

    def write(self, value):
        import ctk
        if type(self._widget) == ctk.ctkSliderWidget:
            self._widget.value = value
        else:
            self._widget.setValue(value)


@parameterNodeGuiConnector
class QComboBoxToStringableConnector(_SignalConnector):
    signal = "currentIndexChanged"

    @staticmethod
    def canRepresent(widget, datatype):
        return type(widget) == QtWidgets.QComboBox and unannotatedType(datatype) in (int, float, str, bool)

    @staticmethod
    def create(widget, datatype):
        choice = findFirstAnnotation(splitAnnotations(datatype)[1], Choice)
        if choice is None:
            raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        connector = QComboBoxToStringableConnector(widget)
        connector._choices = choice.choices
        widget.clear()
        for c in choice.choices:
            widget.addItem(str(c))
        return connector

    def read(self):
        return self._choices[self._widget.currentIndex()]

    def write(self, value):
        self._widget.setCurrentIndex(list(self._choices).index(value))


@parameterNodeGuiConnector
class QLineEditToStrConnector(_SignalConnector):
    signal = "textChanged"

    @staticmethod
    def canRepresent(widget, datatype):
        return type(widget) == QtWidgets.QLineEdit and unannotatedType(datatype) == str

    @staticmethod
    def create(widget, datatype):
        return QLineEditToStrConnector(widget)

    def read(self):
        return self._widget.text()

    def write(self, value):
        self._widget.setText(value)  # as Slicer's connector: every time (the cursor goes to the end)


@parameterNodeGuiConnector
class ctkPathLineEditToPathConnector(_SignalConnector):
    signal = "currentPathChanged"

    @staticmethod
    def canRepresent(widget, datatype):
        import ctk
        return type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) in _PATH_TYPES

    @staticmethod
    def create(widget, datatype):
        connector = ctkPathLineEditToPathConnector(widget)
        connector._type = unannotatedType(datatype)
        return connector

    def read(self):
        return self._type(self._widget.currentPath)

    def write(self, value):
        self._widget.currentPath = str(value)


@parameterNodeGuiConnector
class qMRMLNodeComboBoxToNodeConnector(_SignalConnector):
    signal = "currentNodeChanged"

    @staticmethod
    def canRepresent(widget, datatype):
        import slicer
        return type(widget) == slicer.qMRMLNodeComboBox and _isNodeType(unannotatedType(datatype))

    @staticmethod
    def create(widget, datatype):
        widget.nodeTypes = [unannotatedType(datatype).__name__]
        return qMRMLNodeComboBoxToNodeConnector(widget)

    def read(self):
        return self._widget.currentNode()

    def write(self, value):
        self._widget.setCurrentNode(value)


# ---- wrapper.py ----

def _processClass(classtype):
    members = typing.get_type_hints(classtype, include_extras=True)
    allParameters = {}
    for name, nametype in members.items():
        serializer = _createSerializer(nametype)
        default = getattr(classtype, name) if hasattr(classtype, name) else serializer.default()
        allParameters[name] = (serializer, default, nametype)
        setattr(classtype, name, property(
            lambda self, n=name: self._read(n),
            lambda self, value, n=name: self._write(n, value)))

    def __init__(self, parameterNode, prefix=None):
        self.parameterNode = parameterNode
        self._parameterGUIs = {}
        self._nextTag = 0
        self._updatingGUIFromParameterNode = False
        for n, (serializer, default, _) in allParameters.items():
            if not serializer.isIn(parameterNode, n):
                serializer.write(parameterNode, n, default)

    def _read(self, n):
        serializer, default, _ = allParameters[n]
        if not serializer.isIn(self.parameterNode, n):
            serializer.write(self.parameterNode, n, default)
        return serializer.read(self.parameterNode, n)

    def _write(self, n, value):
        wasModified = self.parameterNode.StartModify()
        try:
            allParameters[n][0].write(self.parameterNode, n, value)
        finally:
            self.parameterNode.EndModify(wasModified)

    def _check(self, n):
        if n not in allParameters:
            raise ValueError(f"Cannot find a param with the given name: {n}")

    def getValue(self, n):
        _check(self, n)
        return _read(self, n)

    def setValue(self, n, value):
        _check(self, n)
        _write(self, n, value)

    def dataType(n):
        _check(classtype, n)
        return allParameters[n][2]

    def _updateGUI(self):
        if self._updatingGUIFromParameterNode:
            return
        try:
            self._updatingGUIFromParameterNode = True
            for mapping in self._parameterGUIs.values():
                for n, connector in mapping.items():
                    connector.write(self.getValue(n))
        finally:
            self._updatingGUIFromParameterNode = False

    def connectParametersToGui(self, mapping):
        for n in mapping:
            _check(self, n)
        connectors = {n: w if isinstance(w, GuiConnector) else createGuiConnector(w, dataType(n))
                      for n, w in mapping.items()}
        tag = self._nextTag
        self._nextTag += 1
        self._parameterGUIs[tag] = connectors
        for n, connector in connectors.items():
            connector.write(self.getValue(n))

            def callback(n=n, connector=connector):
                wasModified = self.parameterNode.StartModify()
                try:
                    if not self._updatingGUIFromParameterNode:
                        self.setValue(n, connector.read())
                finally:
                    self.parameterNode.EndModify(wasModified)
            connector.onChanged(callback)
        self.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: _updateGUI(self))
        return tag

    def connectGui(self, gui):
        paramNameToWidget = {}
        if isinstance(gui, QtWidgets.QWidget):
            widgets = gui.findChildren(QtWidgets.QWidget)
        else:
            widgets = list(gui.__dict__.values())
        for widget in widgets:
            name = widget.property(SlicerParameterNamePropertyName)
            if name:
                paramNameToWidget[name] = widget
        connectParametersToGui(self, paramNameToWidget)  # released Slicer returns no tag (Slicer#7547)

    def disconnectGui(self, tag):
        if tag in self._parameterGUIs:
            for connector in self._parameterGUIs[tag].values():
                connector.onChanged(None)
            del self._parameterGUIs[tag]

    def checkedSetAttr(attr, value):
        if hasattr(classtype, attr):
            raise ValueError(f"Cannot use reserved name '{attr}' in a parameterNodeWrapper")
        setattr(classtype, attr, value)

    classtype.__init__ = __init__
    checkedSetAttr("allParameters", {n: v[2] for n, v in allParameters.items()})
    checkedSetAttr("_is_parameter_node_wrapper", True)
    checkedSetAttr("_read", _read)
    checkedSetAttr("_write", _write)
    checkedSetAttr("getValue", getValue)
    checkedSetAttr("setValue", setValue)
    checkedSetAttr("dataType", staticmethod(dataType))
    checkedSetAttr("connectGui", connectGui)
    checkedSetAttr("connectParametersToGui", connectParametersToGui)
    checkedSetAttr("disconnectGui", disconnectGui)
    checkedSetAttr("StartModify", lambda self: self.parameterNode.StartModify())
    checkedSetAttr("EndModify", lambda self, wasModified: self.parameterNode.EndModify(wasModified))
    checkedSetAttr("AddObserver", lambda self, event, callback, priority=0.0:
                   self.parameterNode.AddObserver(event, callback, priority))
    checkedSetAttr("RemoveObserver", lambda self, tag: self.parameterNode.RemoveObserver(tag))
    checkedSetAttr("Modified", lambda self: self.parameterNode.Modified())
    return classtype


def parameterNodeWrapper(classtype=None):
    def wrap(cls):
        return _processClass(cls)
    return wrap if classtype is None else wrap(classtype)


def isParameterNodeWrapper(obj):
    return getattr(obj, "_is_parameter_node_wrapper", False)
