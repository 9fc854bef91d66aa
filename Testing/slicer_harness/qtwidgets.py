"""Stand-ins for the CTK and MRML Qt widgets the CoreDiffSlicer .ui uses, on real PySide6 widgets.

Each class mirrors the Qt properties, signals and slots of the real widget that CoreDiffSlicer
(and Slicer's parameterNodeWrapper connectors) use. Properties are declared with
``QtCore.Property`` so that QUiLoader sets them from the .ui XML exactly as Designer-generated
code does in Slicer, and so they read as attributes (PythonQt style). Anything not declared here
does not exist: using it raises AttributeError.
"""

from PySide6 import QtCore, QtGui, QtWidgets


class ctkComboBox(QtWidgets.QComboBox):
    """Mirrors CTK's ``ctkComboBox`` (a QComboBox subclass; only the QComboBox API is used)."""


class ctkCollapsibleButton(QtWidgets.QFrame):
    """Mirrors ``ctkCollapsibleButton``: a header button that shows/hides its contents.

    Properties: ``text`` (str), ``collapsed`` (bool). Signal: ``contentsCollapsed(bool)``.
    """

    contentsCollapsed = QtCore.Signal(bool)
    HEADER = 24

    def __init__(self, parent=None):
        super().__init__(parent)
        self._text = ""
        self._collapsed = False
        self.setFrameShape(QtWidgets.QFrame.StyledPanel)

    def _getText(self):
        return self._text

    def _setText(self, text):
        self._text = str(text)
        self.update()

    def _getCollapsed(self):
        return self._collapsed

    def _setCollapsed(self, collapsed):
        collapsed = bool(collapsed)
        if collapsed == self._collapsed:
            return
        self._collapsed = collapsed
        self._applyChrome()
        self.setMaximumHeight(self.HEADER + 4 if collapsed else 16777215)
        self.contentsCollapsed.emit(collapsed)
        self.update()

    text = QtCore.Property(str, _getText, _setText)
    collapsed = QtCore.Property(bool, _getCollapsed, _setCollapsed)

    def _applyChrome(self):
        # keep the contents below the header and children visibility in line with ``collapsed``
        layout = self.layout()
        if layout is not None:
            m = layout.contentsMargins()
            if m.top() < self.HEADER + 4:
                layout.setContentsMargins(m.left(), self.HEADER + 4, m.right(), m.bottom())
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
            child.setVisible(not self._collapsed)

    def showEvent(self, event):
        self._applyChrome()
        super().showEvent(event)

    def mousePressEvent(self, event):
        if event.position().y() <= self.HEADER:
            self._setCollapsed(not self._collapsed)
        else:
            super().mousePressEvent(event)

    def paintEvent(self, event):
        super().paintEvent(event)
        painter = QtGui.QPainter(self)
        rect = QtCore.QRect(1, 1, self.width() - 2, self.HEADER)
        option = QtWidgets.QStyleOptionButton()
        option.initFrom(self)
        option.rect = rect
        self.style().drawControl(QtWidgets.QStyle.CE_PushButtonBevel, option, painter, self)
        arrow = QtWidgets.QStyleOption()
        arrow.initFrom(self)
        arrow.rect = QtCore.QRect(6, 6, 12, 12)
        self.style().drawPrimitive(QtWidgets.QStyle.PE_IndicatorArrowRight if self._collapsed
                                   else QtWidgets.QStyle.PE_IndicatorArrowDown, arrow, painter, self)
        painter.drawText(QtCore.QRect(24, 1, rect.width() - 28, self.HEADER),
                         QtCore.Qt.AlignVCenter | QtCore.Qt.AlignLeft, self._text)
        painter.end()


class ctkSliderWidget(QtWidgets.QWidget):
    """Mirrors ``ctkSliderWidget``: a slider + spin box holding a double.

    Properties: value, minimum, maximum, singleStep (double), decimals (int).
    Signal: ``valueChanged(double)``.
    """

    valueChanged = QtCore.Signal(float)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._slider = QtWidgets.QSlider(QtCore.Qt.Horizontal, self)
        self._spin = QtWidgets.QDoubleSpinBox(self)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._slider, 1)
        layout.addWidget(self._spin)
        self._decimals = 2
        self._singleStep = 1.0
        self._spin.setDecimals(2)
        self._spin.setRange(0.0, 99.0)
        self._syncSlider()
        self._spin.valueChanged.connect(self._onSpin)
        self._slider.valueChanged.connect(self._onSlider)

    def _scale(self):
        return 10 ** self._decimals

    def _syncSlider(self):
        blocked = self._slider.blockSignals(True)
        self._slider.setRange(int(round(self._spin.minimum() * self._scale())),
                              int(round(self._spin.maximum() * self._scale())))
        self._slider.setValue(int(round(self._spin.value() * self._scale())))
        blocked = self._slider.blockSignals(blocked)

    def _onSpin(self, value):
        self._syncSlider()
        self.valueChanged.emit(float(value))

    def _onSlider(self, position):
        self._spin.setValue(position / self._scale())

    def _getValue(self):
        return float(self._spin.value())

    def _setValue(self, value):
        self._spin.setValue(float(value))

    def _getMinimum(self):
        return float(self._spin.minimum())

    def _setMinimum(self, value):
        self._spin.setMinimum(float(value))
        self._syncSlider()

    def _getMaximum(self):
        return float(self._spin.maximum())

    def _setMaximum(self, value):
        self._spin.setMaximum(float(value))
        self._syncSlider()

    def _getSingleStep(self):
        return self._singleStep

    def _setSingleStep(self, value):
        self._singleStep = float(value)
        self._spin.setSingleStep(self._singleStep)

    def _getDecimals(self):
        return self._decimals

    def _setDecimals(self, value):
        self._decimals = int(value)
        self._spin.setDecimals(self._decimals)
        self._syncSlider()

    value = QtCore.Property(float, _getValue, _setValue)
    minimum = QtCore.Property(float, _getMinimum, _setMinimum)
    maximum = QtCore.Property(float, _getMaximum, _setMaximum)
    singleStep = QtCore.Property(float, _getSingleStep, _setSingleStep)
    decimals = QtCore.Property(int, _getDecimals, _setDecimals)


class ctkPathLineEdit(QtWidgets.QWidget):
    """Mirrors ``ctkPathLineEdit``: properties ``currentPath`` (str), ``nameFilters`` (QStringList);
    signal ``currentPathChanged(QString)``, emitted, as CTK's, only for a path its validator accepts
    (one that matches a name filter; with none, any non-empty path): never for an emptied field."""

    currentPathChanged = QtCore.Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._edit = QtWidgets.QLineEdit(self)
        self._button = QtWidgets.QToolButton(self)
        self._button.setText("...")
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._edit, 1)
        layout.addWidget(self._button)
        self._nameFilters = []
        self._edit.textChanged.connect(self._onTextChanged)

    def _onTextChanged(self, text):
        import fnmatch
        import re as _re
        patterns = [p for f in self._nameFilters for p in (_re.findall(r"\(([^)]*)\)", f) or [f])[0].split()]
        if text and (not patterns or any(fnmatch.fnmatch(text, p) for p in patterns)):
            self.currentPathChanged.emit(text)

    def _getCurrentPath(self):
        return self._edit.text()

    def _setCurrentPath(self, path):
        self._edit.setText("" if path is None else str(path))  # as CTK: the text as given ("." stays ".")

    def _getNameFilters(self):
        return list(self._nameFilters)

    def _setNameFilters(self, filters):
        self._nameFilters = list(filters)

    currentPath = QtCore.Property(str, _getCurrentPath, _setCurrentPath)
    nameFilters = QtCore.Property("QStringList", _getNameFilters, _setNameFilters)


class qMRMLWidget(QtWidgets.QWidget):
    """Mirrors ``qMRMLWidget``: slot ``setMRMLScene(vtkMRMLScene*)`` re-emitted as
    ``mrmlSceneChanged(vtkMRMLScene*)`` (the .ui connects it to each MRML widget)."""

    mrmlSceneChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(QtWidgets.QWidget):
    """Mirrors ``qMRMLNodeComboBox``: lists the scene's nodes of ``nodeTypes``.

    Properties: nodeTypes (QStringList), noneEnabled, addEnabled, removeEnabled, renameEnabled,
    showChildNodeTypes, showHidden, selectNodeUponCreation (bool), noneDisplay (str),
    currentNodeID (str, read-only). Slots: setMRMLScene, setCurrentNode, setCurrentNodeID.
    Methods: currentNode, mrmlScene, nodeCount, nodeFromIndex.
    Signal: currentNodeChanged(vtkMRMLNode*).
    """

    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._combo = QtWidgets.QComboBox(self)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._combo)
        self._scene = None
        self._nodeTypes = []
        self._noneEnabled = False
        self._addEnabled = True
        self._removeEnabled = True
        self._renameEnabled = False
        self._showChildNodeTypes = True
        self._showHidden = False
        self._selectNodeUponCreation = True
        self._noneDisplay = "None"
        self._current = None
        self._updating = False
        self._combo.currentIndexChanged.connect(self._onIndexChanged)

    # properties
    def _prop(name, typ):  # noqa: N805 - helper building a Qt property over self._<name>
        attr = "_" + name

        def getter(self):
            return getattr(self, attr)

        def setter(self, value):
            setattr(self, attr, value)
            self._refresh()
        return QtCore.Property(typ, getter, setter)

    nodeTypes = _prop("nodeTypes", "QStringList")
    noneEnabled = _prop("noneEnabled", bool)
    addEnabled = _prop("addEnabled", bool)
    removeEnabled = _prop("removeEnabled", bool)
    renameEnabled = _prop("renameEnabled", bool)
    showChildNodeTypes = _prop("showChildNodeTypes", bool)
    showHidden = _prop("showHidden", bool)
    selectNodeUponCreation = _prop("selectNodeUponCreation", bool)
    noneDisplay = _prop("noneDisplay", str)
    del _prop

    def _getCurrentNodeID(self):
        return self._current.GetID() if self._current is not None else ""

    currentNodeID = QtCore.Property(str, _getCurrentNodeID)

    # scene
    def setMRMLScene(self, scene):
        if self._scene is not None:
            self._scene._removeListener(self._refresh)
        self._scene = scene
        if scene is not None:
            scene._addListener(self._refresh)
        self._refresh()

    def mrmlScene(self):
        return self._scene

    def _matches(self, node):
        if node.GetHideFromEditors() and not self._showHidden:
            return False
        for typeName in self._nodeTypes:
            if node.GetClassName() == typeName:
                return True
            if self._showChildNodeTypes and node.IsA(typeName):
                return True
        return False

    def _nodes(self):
        if self._scene is None:
            return []
        return [n for n in self._scene._nodes if self._matches(n)]

    def _refresh(self, *unused):
        nodes = self._nodes()
        if self._current is not None and self._current not in nodes:
            self._current = None
        if self._current is None and not self._noneEnabled and nodes:
            self._current = nodes[0]
        self._updating = True
        try:
            self._combo.clear()
            if self._noneEnabled:
                self._combo.addItem(self._noneDisplay, "")
            for n in nodes:
                self._combo.addItem(n.GetName(), n.GetID())
            self._combo.setCurrentIndex(self._combo.findData(self._current.GetID() if self._current else ""))
        finally:
            self._updating = False
        if getattr(self, "_lastEmitted", None) is not self._current:
            self._lastEmitted = self._current
            self.currentNodeChanged.emit(self._current)

    def _onIndexChanged(self, index):
        if self._updating:
            return
        nodeID = self._combo.itemData(index)
        self.setCurrentNodeID(nodeID or "")

    def currentNode(self):
        return self._current

    def setCurrentNode(self, node):
        if node is not None and (self._scene is None or node not in self._nodes()):
            # qMRMLNodeComboBox ignores nodes it does not list
            return
        self._current = node
        self._refresh()

    def setCurrentNodeID(self, nodeID):
        self.setCurrentNode(self._scene.GetNodeByID(nodeID) if (nodeID and self._scene) else None)

    def nodeCount(self):
        return len(self._nodes())

    def nodeFromIndex(self, index):
        return self._nodes()[index]


CUSTOM_WIDGETS = [ctkComboBox, ctkCollapsibleButton, ctkSliderWidget, ctkPathLineEdit, qMRMLWidget,
                  qMRMLNodeComboBox]
