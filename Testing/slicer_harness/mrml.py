"""Stand-ins for the MRML classes CoreDiffSlicer touches, built on real VTK objects.

Nodes derive from ``vtk.vtkObject`` so AddObserver / RemoveObserver / Modified / InvokeEvent are
VTK's own. Image data is a real ``vtkImageData`` and geometry a real ``vtkMatrix4x4``, stored the
way ``vtkMRMLVolumeNode`` stores it (origin, spacing, 3x3 directions). Only the methods listed
here exist; anything else raises AttributeError.
"""

import math

import vtk


class vtkMRMLNode(vtk.vtkObject):
    """Mirrors vtkMRMLNode: ID, name, attributes, node references, StartModify/EndModify,
    singleton tag, HideFromEditors."""

    _superClasses = ("vtkMRMLNode",)

    def __init__(self):
        super().__init__()
        self._id = None
        self._name = ""
        self._scene = None
        self._refs = {}
        self._attributes = {}
        self._hide = False
        self._singletonTag = None
        self._disableModified = 0
        self._modifiedPending = False

    def GetClassName(self):
        return type(self).__name__

    def IsA(self, className):
        return className in [c.__name__ for c in type(self).__mro__]

    def GetID(self):
        return self._id

    def GetName(self):
        return self._name

    def SetName(self, name):
        self._name = str(name)
        self.Modified()

    def GetScene(self):
        return self._scene

    def GetHideFromEditors(self):
        return int(self._hide)

    def SetHideFromEditors(self, hide):
        self._hide = bool(hide)

    def SetSingletonTag(self, tag):
        self._singletonTag = tag

    def GetSingletonTag(self):
        return self._singletonTag

    def SetAttribute(self, name, value):
        self._attributes[name] = value

    def GetAttribute(self, name):
        return self._attributes.get(name)

    def GetAttributeNames(self):
        return tuple(self._attributes)

    def RemoveAttribute(self, name):
        self._attributes.pop(name, None)

    def SetNodeReferenceID(self, role, nodeID):
        if nodeID:
            self._refs[role] = nodeID
        else:
            self._refs.pop(role, None)
        self.Modified()

    def GetNodeReferenceID(self, role):
        return self._refs.get(role)

    def GetNodeReference(self, role):
        nodeID = self._refs.get(role)
        if nodeID is None or self._scene is None:
            return None
        return self._scene.GetNodeByID(nodeID)

    def RemoveNodeReferenceIDs(self, role):
        self._refs.pop(role, None)
        self.Modified()

    def Modified(self):
        if self._disableModified:
            self._modifiedPending = True
        else:
            super().Modified()

    def StartModify(self):
        previous = self._disableModified
        self._disableModified = 1
        return previous

    def EndModify(self, previous):
        self._disableModified = previous
        if not previous and self._modifiedPending:
            self._modifiedPending = False
            self.Modified()
        return previous


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    """Mirrors vtkMRMLScriptedModuleNode: string parameters and ModuleName."""

    def __init__(self):
        super().__init__()
        self._params = {}
        self._moduleName = ""
        self._hide = True

    def SetModuleName(self, name):
        self._moduleName = name

    def GetModuleName(self):
        return self._moduleName

    def SetParameter(self, name, value):
        if not isinstance(value, str):
            raise TypeError(f"SetParameter expects str, got {type(value)}")
        if self._params.get(name) != value:
            self._params[name] = value
            self.Modified()

    def GetParameter(self, name):
        return self._params.get(name, "")

    def HasParameter(self, name):
        return name in self._params

    def UnsetParameter(self, name):
        if self._params.pop(name, None) is not None:
            self.Modified()

    def GetParameterNames(self):
        return list(self._params)


class vtkMRMLDisplayableNode(vtkMRMLNode):
    """Mirrors vtkMRMLDisplayableNode with its vtkMRMLTransformableNode base: display node
    and parent transform references."""

    def __init__(self):
        super().__init__()
        self._displayNodeID = None
        self._transformNodeID = None

    def SetAndObserveTransformNodeID(self, nodeID):
        self._transformNodeID = nodeID
        self.Modified()

    def GetTransformNodeID(self):
        return self._transformNodeID

    def GetParentTransformNode(self):
        return self._scene.GetNodeByID(self._transformNodeID) if (self._transformNodeID and self._scene) else None

    def GetDisplayNode(self):
        return self._scene.GetNodeByID(self._displayNodeID) if (self._displayNodeID and self._scene) else None

    def SetAndObserveDisplayNodeID(self, nodeID):
        self._displayNodeID = nodeID
        self.Modified()


class vtkMRMLLinearTransformNode(vtkMRMLNode):
    """Mirrors vtkMRMLLinearTransformNode (one level, no parent of its own): a matrix to parent
    (= to world here) and the world-to-local transform as a real VTK transform."""

    def __init__(self):
        super().__init__()
        self._toParent = vtk.vtkMatrix4x4()

    def SetMatrixTransformToParent(self, matrix):
        self._toParent.DeepCopy(matrix)
        self.Modified()

    def GetMatrixTransformToParent(self, matrix):
        matrix.DeepCopy(self._toParent)

    def GetTransformFromWorld(self):
        inverse = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(self._toParent, inverse)
        transform = vtk.vtkTransform()
        transform.SetMatrix(inverse)
        return transform

    def GetTransformToWorld(self):
        transform = vtk.vtkTransform()
        transform.SetMatrix(self._toParent)
        return transform

    def IsTransformToWorldLinear(self):
        return True

    def GetMatrixTransformToWorld(self, matrix):
        matrix.DeepCopy(self._toParent)


class vtkMRMLScalarVolumeDisplayNode(vtkMRMLNode):
    """Mirrors vtkMRMLScalarVolumeDisplayNode window/level."""

    def __init__(self):
        super().__init__()
        self._hide = True
        self._window, self._level, self._auto = 256.0, 128.0, 1

    def SetWindowLevel(self, window, level):
        self._window, self._level = float(window), float(level)
        self.Modified()

    def GetWindow(self):
        return self._window

    def GetLevel(self):
        return self._level

    def SetAutoWindowLevel(self, on):
        self._auto = int(bool(on))
        self.Modified()

    def GetAutoWindowLevel(self):
        return self._auto


class vtkMRMLVolumeNode(vtkMRMLDisplayableNode):
    """Mirrors vtkMRMLVolumeNode geometry: IJKToRAS = [directions * spacing | origin]."""

    def __init__(self):
        super().__init__()
        self._origin = [0.0, 0.0, 0.0]
        self._spacing = [1.0, 1.0, 1.0]
        self._directions = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        self._imageData = None

    def GetImageData(self):
        return self._imageData

    def SetAndObserveImageData(self, imageData):
        self._imageData = imageData
        self.Modified()

    def GetSpacing(self):
        return tuple(self._spacing)

    def SetSpacing(self, *spacing):
        self._spacing = [float(s) for s in (spacing[0] if len(spacing) == 1 else spacing)]
        self.Modified()

    def GetOrigin(self):
        return tuple(self._origin)

    def SetOrigin(self, *origin):
        self._origin = [float(s) for s in (origin[0] if len(origin) == 1 else origin)]
        self.Modified()

    def GetIJKToRASMatrix(self, matrix):
        matrix.Identity()
        for row in range(3):
            for col in range(3):
                matrix.SetElement(row, col, self._directions[row][col] * self._spacing[col])
            matrix.SetElement(row, 3, self._origin[row])

    def SetIJKToRASMatrix(self, matrix):
        for col in range(3):
            length = math.sqrt(sum(matrix.GetElement(row, col) ** 2 for row in range(3)))
            self._spacing[col] = length
            for row in range(3):
                self._directions[row][col] = matrix.GetElement(row, col) / length if length else 0.0
        self._origin = [matrix.GetElement(row, 3) for row in range(3)]
        self.Modified()

    def GetRASToIJKMatrix(self, matrix):
        ijkToRAS = vtk.vtkMatrix4x4()
        self.GetIJKToRASMatrix(ijkToRAS)
        vtk.vtkMatrix4x4.Invert(ijkToRAS, matrix)

    def CopyOrientation(self, node):
        self._origin = list(node._origin)
        self._spacing = list(node._spacing)
        self._directions = [list(r) for r in node._directions]
        self.Modified()

    def CreateDefaultDisplayNodes(self):
        if self.GetDisplayNode() is not None:
            return
        display = self._scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        self.SetAndObserveDisplayNodeID(display.GetID())


class vtkMRMLScalarVolumeNode(vtkMRMLVolumeNode):
    pass


class vtkMRMLLabelMapVolumeNode(vtkMRMLScalarVolumeNode):
    pass


class vtkMRMLMarkupsROINode(vtkMRMLDisplayableNode):
    """Mirrors vtkMRMLMarkupsROINode: a box of ``size`` centred on ``center``, its axes those of
    GetObjectToNodeMatrix()'s rotation (the identity unless a test rotates it; no parent transform)."""

    def __init__(self):
        super().__init__()
        self._center = [0.0, 0.0, 0.0]
        self._size = [0.0, 0.0, 0.0]
        self._axes = vtk.vtkMatrix4x4()  # rotation part only; the centre is added on the way out

    def GetObjectToNodeMatrix(self):
        """The box's axes (modify in place, then call Modified(), as in Slicer)."""
        return self._axes

    def GetObjectToWorldMatrix(self):
        m = vtk.vtkMatrix4x4()
        m.DeepCopy(self._axes)
        for axis in range(3):
            m.SetElement(axis, 3, self._center[axis])
        return m

    def SetCenter(self, *center):
        self._center = [float(c) for c in (center[0] if len(center) == 1 else center)]
        self.Modified()

    def GetCenter(self, center):
        center[:] = self._center

    def SetSize(self, *size):
        self._size = [float(c) for c in (size[0] if len(size) == 1 else size)]
        self.Modified()

    def GetSize(self, size):
        size[:] = self._size

    def GetRASBounds(self, bounds):
        m = self.GetObjectToWorldMatrix()
        corners = [m.MultiplyPoint([sx * self._size[0] / 2, sy * self._size[1] / 2, sz * self._size[2] / 2, 1.0])[:3]
                   for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
        for axis in range(3):
            bounds[2 * axis] = min(c[axis] for c in corners)
            bounds[2 * axis + 1] = max(c[axis] for c in corners)


class vtkMRMLSliceCompositeNode(vtkMRMLNode):
    """Mirrors vtkMRMLSliceCompositeNode layers and link flags."""

    def __init__(self):
        super().__init__()
        self._hide = True
        self._background = None
        self._foreground = None
        self._opacity = 0.0
        self._linked = 0
        self._hotLinked = 0

    def SetBackgroundVolumeID(self, nodeID):
        self._background = nodeID
        self.Modified()

    def GetBackgroundVolumeID(self):
        return self._background

    def SetForegroundVolumeID(self, nodeID):
        self._foreground = nodeID
        self.Modified()

    def GetForegroundVolumeID(self):
        return self._foreground

    def SetForegroundOpacity(self, opacity):
        self._opacity = float(opacity)
        self.Modified()

    def GetForegroundOpacity(self):
        return self._opacity

    def SetLinkedControl(self, on):
        self._linked = int(bool(on))
        self.Modified()

    def GetLinkedControl(self):
        return self._linked

    def SetHotLinkedControl(self, on):
        self._hotLinked = int(bool(on))
        self.Modified()

    def GetHotLinkedControl(self):
        return self._hotLinked


class vtkMRMLSliceNode(vtkMRMLNode):
    """Mirrors vtkMRMLSliceNode: SliceToRAS (real vtkMatrix4x4), orientation presets,
    JumpSliceByCentering."""

    _ORIENTATIONS = {
        "Axial": ((-1, 0, 0), (0, 1, 0), (0, 0, 1)),
        "Sagittal": ((0, 0, 1), (-1, 0, 0), (0, 1, 0)),
        "Coronal": ((-1, 0, 0), (0, 0, 1), (0, 1, 0)),
    }

    def __init__(self):
        super().__init__()
        self._hide = True
        self._sliceToRAS = vtk.vtkMatrix4x4()
        self._fieldOfView = (250.0, 250.0, 1.0)
        self._orientation = "Axial"
        self.SetOrientation("Axial")

    def SetFieldOfView(self, x, y, z):
        self._fieldOfView = (float(x), float(y), float(z))
        self.Modified()

    def GetFieldOfView(self):
        return self._fieldOfView

    def UpdateMatrices(self):
        self.Modified()

    def SetOrientation(self, name):
        rows = self._ORIENTATIONS[name]
        for r in range(3):
            for c in range(3):
                self._sliceToRAS.SetElement(r, c, rows[r][c])
        self._orientation = name
        self.Modified()
        return True

    def GetOrientation(self):
        return self._orientation

    def GetSliceToRAS(self):
        return self._sliceToRAS

    def RotateToVolumePlane(self, volumeNode, forceSlicePlaneToSingleSlice=True):
        """As Slicer: each slice axis becomes the volume axis (under its linear parent transform)
        nearest to it, with the same sign; the slice centre stays."""
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        axes = [[ijkToRAS.GetElement(r, c) for r in range(3)] for c in range(3)]
        transformNode = volumeNode.GetParentTransformNode()
        if transformNode is not None and transformNode.IsTransformToWorldLinear():
            toWorld = vtk.vtkMatrix4x4()
            transformNode.GetMatrixTransformToWorld(toWorld)
            axes = [toWorld.MultiplyPoint(list(a) + [0.0])[:3] for a in axes]
        axes = [[v / math.sqrt(sum(x * x for x in a)) for v in a] for a in axes]
        for c in range(3):
            current = [self._sliceToRAS.GetElement(r, c) for r in range(3)]
            dots = [sum(u * v for u, v in zip(a, current)) for a in axes]
            best = max(range(3), key=lambda k: abs(dots[k]))
            sign = 1.0 if dots[best] >= 0 else -1.0
            for r in range(3):
                self._sliceToRAS.SetElement(r, c, sign * axes[best][r])
        self._orientation = "Reformat"
        self.Modified()
        return True

    def JumpSliceByCentering(self, r, a, s):
        for i, v in enumerate((r, a, s)):
            self._sliceToRAS.SetElement(i, 3, float(v))
        self.Modified()


class vtkMRMLLayoutNode(vtkMRMLNode):
    """Layout ids used by CoreDiffSlicer (values from vtkMRMLLayoutNode.h)."""
    SlicerLayoutConventionalView = 2
    SlicerLayoutFourUpView = 3
    SlicerLayoutOneUpRedSliceView = 6
    SlicerLayoutSideBySideView = 29


class vtkMRMLSubjectHierarchyNode(vtkMRMLNode):
    """Mirrors the subject hierarchy item tree: items are integers, 0 is invalid."""

    def __init__(self):
        super().__init__()
        self._hide = True
        self._items = {1: {"parent": 0, "node": None, "name": "Scene"}}
        self._next = 2

    @staticmethod
    def GetSubjectHierarchyNode(scene):
        return scene._subjectHierarchy

    def GetInvalidItemID(self):
        return 0

    def GetSceneItemID(self):
        return 1

    def CreateFolderItem(self, parentItem, name):
        return self._create(parentItem, None, name)

    def _create(self, parentItem, node, name):
        item = self._next
        self._next += 1
        self._items[item] = {"parent": parentItem, "node": node, "name": name}
        return item

    def GetItemByDataNode(self, node):
        for item, data in self._items.items():
            if data["node"] is node:
                return item
        return 0

    def GetItemDataNode(self, item):
        return self._items[item]["node"] if item in self._items else None

    def GetItemParent(self, item):
        return self._items[item]["parent"] if item in self._items else 0

    def SetItemParent(self, item, parentItem):
        if item not in self._items or parentItem not in self._items:
            raise ValueError("invalid subject hierarchy item")
        self._items[item]["parent"] = parentItem

    def GetItemName(self, item):
        data = self._items.get(item)
        return (data["node"].GetName() if data["node"] is not None else data["name"]) if data else ""

    def _removeNode(self, node):
        for item in [i for i, d in self._items.items() if d["node"] is node]:
            del self._items[item]


_NODE_CLASSES = {c.__name__: c for c in (
    vtkMRMLScriptedModuleNode, vtkMRMLScalarVolumeNode, vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeDisplayNode, vtkMRMLMarkupsROINode, vtkMRMLSliceCompositeNode, vtkMRMLSliceNode,
    vtkMRMLLinearTransformNode)}

# Nodes that get a subject hierarchy item when added (the SH plugins do this in Slicer).
_DATA_NODE_CLASSES = (vtkMRMLVolumeNode, vtkMRMLMarkupsROINode)


class vtkMRMLScene(vtk.vtkObject):
    """Mirrors vtkMRMLScene: node registry with unique IDs, singleton nodes, events."""

    # vtkMRMLScene::SceneEventType values
    NodeAddedEvent = 0xf000
    NodeRemovedEvent = 0xf001
    StartCloseEvent = 0x2005
    EndCloseEvent = 0x2006

    def __init__(self):
        super().__init__()
        self._nodes = []
        self._counters = {}
        self._listeners = []
        self._subjectHierarchy = vtkMRMLSubjectHierarchyNode()
        self.AddNode(self._subjectHierarchy)

    def GetClassName(self):
        return "vtkMRMLScene"

    # harness-internal: widgets refresh on node add/remove (qMRMLSceneModel does this in Slicer)
    def _addListener(self, callback):
        self._listeners.append(callback)

    def _removeListener(self, callback):
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(self):
        for callback in list(self._listeners):
            callback()

    def CreateNodeByClass(self, className):
        if className not in _NODE_CLASSES:
            raise ValueError(f"harness: node class {className} is not mirrored")
        return _NODE_CLASSES[className]()

    def AddNode(self, node):
        if node._singletonTag:
            existing = self.GetSingletonNode(node._singletonTag, node.GetClassName())
            if existing is not None:
                return existing
        className = node.GetClassName()
        self._counters[className] = self._counters.get(className, 0) + 1
        node._id = f"{className}{self._counters[className]}"
        node._scene = self
        if not node.GetName():
            node.SetName(self.GenerateUniqueName(className.replace("vtkMRML", "").replace("Node", "")))
        self._nodes.append(node)
        if isinstance(node, _DATA_NODE_CLASSES):
            self._subjectHierarchy._create(1, node, node.GetName())
        self.InvokeEvent(self.NodeAddedEvent)
        self._notify()
        return node

    def AddNewNodeByClass(self, className, name=""):
        node = self.CreateNodeByClass(className)
        if name:
            node.SetName(name)
        return self.AddNode(node)

    def GetNodeByID(self, nodeID):
        for node in self._nodes:
            if node.GetID() == nodeID:
                return node
        return None

    def GetFirstNodeByClass(self, className):
        for node in self._nodes:
            if node.IsA(className):
                return node
        return None

    def GetFirstNodeByName(self, name):
        for node in self._nodes:
            if node.GetName() == name:
                return node
        return None

    def GetSingletonNode(self, tag, className):
        for node in self._nodes:
            if node._singletonTag == tag and node.IsA(className):
                return node
        return None

    def GetNumberOfNodes(self):
        return len(self._nodes)

    def IsNodePresent(self, node):
        return int(node in self._nodes)

    def GenerateUniqueName(self, baseName):
        names = {n.GetName() for n in self._nodes}
        if baseName not in names:
            return baseName
        i = 1
        while f"{baseName}_{i}" in names:
            i += 1
        return f"{baseName}_{i}"

    def GetUniqueNameByString(self, baseName):
        return self.GenerateUniqueName(baseName)

    def RemoveNode(self, node):
        if node not in self._nodes:
            return
        self._nodes.remove(node)
        self._subjectHierarchy._removeNode(node)
        if isinstance(node, vtkMRMLDisplayableNode) and node.GetDisplayNode() is not None:
            self.RemoveNode(node.GetDisplayNode())
        node._scene = None
        self.InvokeEvent(self.NodeRemovedEvent)
        self._notify()

    def Clear(self, removeSingletons=False):
        self.InvokeEvent(self.StartCloseEvent)
        for node in list(self._nodes):
            if node is self._subjectHierarchy or (node._singletonTag and not removeSingletons) \
                    or isinstance(node, (vtkMRMLSliceNode, vtkMRMLSliceCompositeNode)):
                continue
            self.RemoveNode(node)
        self.InvokeEvent(self.EndCloseEvent)


class SliceLogic:
    """Mirrors vtkMRMLSliceLogic (the part used): composite/slice nodes, FitSliceToAll."""

    def __init__(self, sliceNode, compositeNode):
        self._sliceNode = sliceNode
        self._compositeNode = compositeNode
        self.fitCount = 0

    def GetSliceCompositeNode(self):
        return self._compositeNode

    def GetSliceNode(self):
        return self._sliceNode

    def FitSliceToAll(self):
        self.fitCount += 1


class SliceWidget:
    """Mirrors qMRMLSliceWidget: sliceLogic(), mrmlSliceNode(), mrmlSliceCompositeNode()."""

    def __init__(self, scene, name):
        self._sliceNode = scene.AddNewNodeByClass("vtkMRMLSliceNode", name)
        self._sliceNode.SetSingletonTag(name)
        self._compositeNode = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode", name)
        self._compositeNode.SetSingletonTag(name)
        self._logic = SliceLogic(self._sliceNode, self._compositeNode)
        if name == "Yellow":
            self._sliceNode.SetOrientation("Sagittal")
        elif name == "Green":
            self._sliceNode.SetOrientation("Coronal")

    def sliceLogic(self):
        return self._logic

    def mrmlSliceNode(self):
        return self._sliceNode

    def mrmlSliceCompositeNode(self):
        return self._compositeNode


class LayoutManager:
    """Mirrors qSlicerLayoutManager: setLayout(int), layout, sliceWidget(name)."""

    def __init__(self, scene):
        self._layout = vtkMRMLLayoutNode.SlicerLayoutFourUpView
        self._sliceWidgets = {name: SliceWidget(scene, name) for name in ("Red", "Yellow", "Green")}

    def setLayout(self, layout):
        self._layout = int(layout)

    @property
    def layout(self):
        return self._layout

    def sliceWidget(self, name):
        return self._sliceWidgets.get(name)
