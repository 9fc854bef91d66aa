"""Extension packaging: CMake files evaluated by real cmake with stand-ins for Slicer's macros,
catalog entries (.s4ext and Extensions Index JSON), icon and screenshot."""

import json
import os
import re
import shutil
import subprocess

import pytest
from PySide6 import QtGui

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stand-ins for the commands a Slicer extension build uses, failing like Slicer's configure step
# when a listed file is missing. project/find_package/add_subdirectory are not available in
# `cmake -P` script mode, so they are redefined; add_subdirectory includes <dir>/CMakeLists.txt.
CMAKE_STUBS = r"""
cmake_minimum_required(VERSION 3.16)
set(REPO "@REPO@")
set(BUILD_TESTING ON)
set(CMAKE_CURRENT_SOURCE_DIR "${REPO}")
function(project name)
  message(STATUS "PROJECT ${name}")
endfunction()
function(find_package name)
  if(NOT name STREQUAL "Slicer")
    message(FATAL_ERROR "unexpected find_package(${name})")
  endif()
  set(Slicer_USE_FILE "@STUBDIR@/UseSlicer.cmake" PARENT_SCOPE)
  set(Slicer_EXTENSION_GENERATE_CONFIG "@STUBDIR@/GenerateConfig.cmake" PARENT_SCOPE)
  set(Slicer_EXTENSION_CPACK "@STUBDIR@/CPack.cmake" PARENT_SCOPE)
endfunction()
function(add_subdirectory dir)
  set(CMAKE_CURRENT_SOURCE_DIR "${CMAKE_CURRENT_SOURCE_DIR}/${dir}")
  if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/CMakeLists.txt")
    message(FATAL_ERROR "add_subdirectory: ${CMAKE_CURRENT_SOURCE_DIR}/CMakeLists.txt does not exist")
  endif()
  include("${CMAKE_CURRENT_SOURCE_DIR}/CMakeLists.txt")
endfunction()
function(_check_file f)
  set(p "${CMAKE_CURRENT_SOURCE_DIR}/${f}")
  if(NOT EXISTS "${p}" AND NOT EXISTS "${p}.py")
    message(FATAL_ERROR "listed file does not exist: ${p}")
  endif()
endfunction()
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "slicerMacroBuildScriptedModule: unknown arguments ${MY_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT MY_NAME OR NOT MY_SCRIPTS)
    message(FATAL_ERROR "slicerMacroBuildScriptedModule: NAME and SCRIPTS are required")
  endif()
  foreach(f IN LISTS MY_SCRIPTS MY_RESOURCES)
    _check_file("${f}")
  endforeach()
  string(REPLACE ";" "," s "${MY_SCRIPTS}")
  string(REPLACE ";" "," r "${MY_RESOURCES}")
  message(STATUS "MODULE ${MY_NAME}|${CMAKE_CURRENT_SOURCE_DIR}|${s}|${r}|${MY_WITH_SUBDIR}|${MY_WITH_GENERIC_TESTS}")
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT;SLICER_ARGS" "" ${ARGN})
  _check_file("${MY_SCRIPT}")
  message(STATUS "UNITTEST ${MY_SCRIPT}")
endfunction()
include("${REPO}/CMakeLists.txt")
foreach(v EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION EXTENSION_ICONURL
          EXTENSION_SCREENSHOTURLS EXTENSION_DEPENDS)
  message(STATUS "VAR ${v}=${${v}}")
endforeach()
"""


@pytest.fixture(scope="module")
def cmakeRun(tmp_path_factory):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    d = tmp_path_factory.mktemp("cmake")
    for name, text in (("UseSlicer.cmake", 'message(STATUS "USE_FILE")'),
                       ("GenerateConfig.cmake", 'message(STATUS "GENERATE_CONFIG")'),
                       ("CPack.cmake", 'message(STATUS "CPACK")')):
        (d / name).write_text(text + "\n")
    script = d / "check.cmake"
    script.write_text(CMAKE_STUBS.replace("@REPO@", REPO).replace("@STUBDIR@", str(d)))
    r = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True, cwd=d)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    return out


def modules(out):
    result = {}
    for line in out.splitlines():
        m = re.search(r"MODULE (.*)", line)
        if m:
            name, src, scripts, resources, subdir, generic = m.group(1).split("|")
            result[name] = dict(dir=src, scripts=[s for s in scripts.split(",") if s],
                                resources=[s for s in resources.split(",") if s],
                                subdir=subdir == "TRUE", generic=generic == "TRUE")
    return result


def test_cmake_configures_with_every_listed_file_present(cmakeRun):
    out = cmakeRun
    assert "PROJECT CoreDiffSlicer" in out
    order = [k for k in ("USE_FILE", "MODULE CoreDiffLib", "MODULE CoreDiffSlicer", "GENERATE_CONFIG", "CPACK")]
    positions = [out.index(k) for k in order]
    assert positions == sorted(positions), "Slicer_USE_FILE, modules, then GENERATE_CONFIG and CPACK"
    assert "UNITTEST CoreDiffSlicer.py" in out
    mods = modules(out)
    gui = mods["CoreDiffSlicer"]
    assert gui["scripts"] == ["CoreDiffSlicer.py"] and gui["generic"]
    assert set(gui["resources"]) == {"Resources/Icons/CoreDiffSlicer.png", "Resources/UI/CoreDiffSlicer.ui"}
    assert mods["CoreDiffLib"]["subdir"]
    variables = dict(re.findall(r"VAR (\w+)=(.*)", out))
    assert variables["EXTENSION_CATEGORY"] == "Filtering"
    assert variables["EXTENSION_DEPENDS"] == "PyTorch"
    for v in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
              "EXTENSION_SCREENSHOTURLS"):
        assert variables[v].strip(), v


def test_every_library_file_is_installed(cmakeRun):
    """A .py file or shipped weight missing from CoreDiffLib/CMakeLists.txt would be absent from
    the installed extension: list it there."""
    lib = modules(cmakeRun)["CoreDiffLib"]
    listed = {s if s.endswith(".py") else s + ".py" for s in lib["scripts"]} | set(lib["resources"])
    present = set()
    root = os.path.join(REPO, "CoreDiffLib")
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), root)
            # weights being written are hidden (".name.partial-…", CoreDiffLib/atomic.py)
            if f.endswith(".py") or (rel.startswith("weights" + os.sep) and not f.startswith(".")
                                     and not f.endswith(".ckpt")):
                present.add(rel.replace(os.sep, "/"))
    assert present - listed == set(), "add these to CoreDiffLib/CMakeLists.txt"


def test_cmake_stub_rejects_a_missing_file(tmp_path):
    """The check itself works: a module listing a missing file fails configuration."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    fake = tmp_path / "repo"
    (fake / "Mod").mkdir(parents=True)
    (fake / "CMakeLists.txt").write_text("project(X)\nfind_package(Slicer REQUIRED)\nadd_subdirectory(Mod)\n")
    (fake / "Mod" / "CMakeLists.txt").write_text("slicerMacroBuildScriptedModule(NAME Mod SCRIPTS Missing.py)\n")
    for name in ("UseSlicer.cmake", "GenerateConfig.cmake", "CPack.cmake"):
        (tmp_path / name).write_text("\n")
    script = tmp_path / "check.cmake"
    script.write_text(CMAKE_STUBS.replace("@REPO@", str(fake)).replace("@STUBDIR@", str(tmp_path)))
    r = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True)
    assert r.returncode != 0 and "Missing.py" in r.stderr


def parseS4ext():
    entries = {}
    for line in open(os.path.join(REPO, "CoreDiffSlicer.s4ext"), encoding="utf-8"):
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            entries[key] = value.strip()
    return entries


def repoPathOfUrl(url):
    prefix = "https://raw.githubusercontent.com/CoreDiffSlicer/CoreDiffSlicer/main/"
    assert url.startswith(prefix), url
    return os.path.join(REPO, url[len(prefix):])


def test_s4ext_entry():
    e = parseS4ext()
    for key in ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "screenshoturls", "enabled"):
        assert e.get(key), key
    assert e["scm"] == "git" and e["depends"] == "PyTorch" and e["category"] == "Filtering"
    assert e["build_subdirectory"] == "." and e["enabled"] == "1"
    assert os.path.isfile(repoPathOfUrl(e["iconurl"]))
    for url in e["screenshoturls"].split():
        assert os.path.isfile(repoPathOfUrl(url))
    cmake = open(os.path.join(REPO, "CMakeLists.txt"), encoding="utf-8").read()
    # one description wherever the extension is described (they had drifted apart)
    assert f'set(EXTENSION_DESCRIPTION "{e["description"]}")' in cmake
    assert f'set(EXTENSION_HOMEPAGE "{e["homepage"]}")' in cmake


def test_extensions_index_json_entry():
    """Against slicer-extension-catalog-entry-schema-v1.0.1 (additionalProperties false)."""
    data = json.load(open(os.path.join(REPO, "CoreDiffSlicer.json"), encoding="utf-8"))
    allowed = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
               "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
    assert set(data) <= set(allowed)
    for key in ("$schema", "category", "scm_url"):
        assert key in data
    for key, value in data.items():
        assert isinstance(value, allowed[key]), key
    assert data["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json")
    assert data["tier"] in (1, 3, 5)
    assert data["build_dependencies"] == ["PyTorch"]
    assert data["scm_url"] == parseS4ext()["scmurl"]
    assert data["category"] == parseS4ext()["category"]


def test_icon_and_screenshot():
    icon = QtGui.QImage(os.path.join(REPO, "CoreDiffSlicer", "Resources", "Icons", "CoreDiffSlicer.png"))
    assert (icon.width(), icon.height()) == (128, 128)
    shot = QtGui.QImage(os.path.join(REPO, "CoreDiffSlicer", "Resources", "Screenshots", "CoreDiffSlicer-1.png"))
    assert shot.width() >= 1000 and shot.height() >= 600


def _annotations_evaluated_at_definition(tree):
    """Annotations Python evaluates when a def or class body runs (not a function's local ones)."""
    import ast
    found = []

    def visit(node, inFunction):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if a is not None and a.annotation is not None:
                    found.append(a.annotation)
            if node.returns is not None:
                found.append(node.returns)
            for child in node.body:
                visit(child, True)
            return
        if isinstance(node, ast.AnnAssign) and not inFunction:
            found.append(node.annotation)
        for child in ast.iter_child_nodes(node):
            visit(child, inFunction and not isinstance(node, ast.ClassDef))
    visit(tree, False)
    return found


def test_the_module_and_the_library_load_on_the_python_39_of_slicer_56_to_58():
    """Slicer 5.6-5.8 ship Python 3.9, and the module runs the library in Slicer's Python. An
    ``int | None`` annotation evaluated at definition (no ``from __future__ import annotations``)
    stopped the module from loading there: TypeError at class definition."""
    import ast
    files = [os.path.join(REPO, "CoreDiffSlicer", "CoreDiffSlicer.py")]
    for root, _, names in os.walk(os.path.join(REPO, "CoreDiffLib")):
        files += [os.path.join(root, n) for n in names if n.endswith(".py")]
    problems = []
    for path in files:
        source = open(path, encoding="utf-8").read()
        tree = ast.parse(source, feature_version=(3, 9))  # no 3.10 syntax (match, parenthesised with)
        if any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
               and any(a.name == "annotations" for a in n.names) for n in tree.body):
            continue  # annotations stay strings
        for annotation in _annotations_evaluated_at_definition(tree):
            if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation)):
                problems.append(f"{os.path.relpath(path, REPO)}:{annotation.lineno}")
    assert problems == [], f"X | Y annotations evaluated on Python 3.9: {problems}"
    assert _annotations_evaluated_at_definition(ast.parse("def f(a: int | None) -> str | None:\n    b: int | None = 1\n"
                                                          "class C:\n    x: int | None\n"))  # the check sees them
