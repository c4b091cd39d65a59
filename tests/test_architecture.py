"""The package's shape, checked: imports point down (no cycle, deferred imports included), no
Python function over 100 lines, no csrc file over 700 lines, every method declared once in the
registry with a reference that exists, every backend module a :class:`fastmerge.backends.Backend`.
``lint-imports`` (pyproject's [tool.importlinter] contract, run by .ci/run) checks the layer
order itself."""
from __future__ import annotations

import ast
import os

import pytest

import fastmerge
from fastmerge import _registry, api
from fastmerge import backends as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fastmerge")


def _modules():
    """``{module name: path}`` of every module in fastmerge/ (the Triton kernels included, under
    the name they are installed as)."""
    out = {}
    for top, name in ((PKG, "fastmerge"), (os.path.join(ROOT, "triton_kernels"), "fastmerge.triton_kernels")):
        for dirpath, _, files in os.walk(top):
            rel = os.path.relpath(dirpath, top)
            parts = [name] + ([] if rel == "." else rel.split(os.sep))
            for f in files:
                if f.endswith(".py"):
                    mod = parts if f == "__init__.py" else parts + [f[:-3]]
                    out[".".join(mod)] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _resolve(current: str, is_pkg: bool, level: int, target):
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    if level:
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([target] if target else []))
    return target


def import_graph() -> dict:
    """``{module: {imported fastmerge modules}}`` from every import statement, at any depth
    (imports deferred into functions count)."""
    graph = {}
    for mod, path in MODULES.items():
        is_pkg = path.endswith("__init__.py")
        deps = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(mod, is_pkg, node.level, node.module)
                # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the package
                names = [f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in node.names]
            else:
                continue
            for n in names:
                # the longest known module the name starts with (``from . import api``: fastmerge.api)
                while n and n not in MODULES:
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    deps.add(n)
        graph[mod] = deps
    return graph


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v, counter=[0]):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_the_cycle_scan_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_bottom_layer_imports_nothing_above_it():
    bottom = {"fastmerge._semantics", "fastmerge._validate", "fastmerge.formats", "fastmerge.abi",
              "fastmerge.philox", "fastmerge._registry", "fastmerge._compile"}
    bottom |= {m for m in MODULES if m.startswith("fastmerge.methods")}  # the specifications
    graph = import_graph()
    for mod in bottom:
        assert graph[mod] <= bottom, (mod, graph[mod] - bottom)


def _functions(path):
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_python_function_over_100_lines():
    long = [(os.path.relpath(p, ROOT), name, n) for mod, p in MODULES.items() if mod.startswith("fastmerge")
            and "triton_kernels" not in mod for name, n in _functions(p) if n > 100]
    assert long == []


def test_no_csrc_file_over_700_lines():
    csrc = os.path.join(ROOT, "csrc")
    long = []
    for f in sorted(os.listdir(csrc)):
        with open(os.path.join(csrc, f), errors="replace") as fh:
            n = sum(1 for _ in fh)
        if n > 700:
            long.append((f, n))
    assert long == []


@pytest.mark.parametrize("method", _registry.METHODS)
def test_every_method_is_registered_once_with_a_reference(method):
    entry = _registry.get(method)
    assert callable(api.reference(method))
    assert callable(getattr(fastmerge, method))  # the alias
    assert set(entry.params) <= set(_registry.ALL_PARAMS)


def test_methods_derive_from_the_registry():
    assert fastmerge.METHODS == tuple(_registry.REGISTRY)
    from fastmerge import lowrank, mergeconfig

    assert set(lowrank.METHODS) == set(_registry.names("svd"))
    assert mergeconfig.METHODS == _registry.METHODS  # fastmerge merge's YAML takes every method


@pytest.mark.parametrize("name", B.NAMES)
def test_every_backend_implements_the_protocol(name):
    mod = B.module(name)
    assert isinstance(mod, B.Backend), name
    assert mod.NAME == name
    assert isinstance(mod.status()["available"], bool)


def test_dispatch_follows_the_registry():
    """``auto`` picks a fused backend only for methods whose entry lists kernels."""
    import torch

    from fastmerge import dispatch

    cpu = torch.device("cpu")
    fused = "cpu" if fastmerge.backends()["cpu"]["available"] else "torch"
    for name, entry in _registry.REGISTRY.items():
        assert dispatch.resolve("auto", cpu, name) == (fused if "cpu" in entry.kernels else "torch"), name


def test_import_and_a_cpu_merge_load_no_heavy_optional_library():
    """Start-up is a fixed cost of every ``fastmerge merge`` (issue 19): ``import fastmerge`` and
    a merge on the CPU must not import triton, transformers, matplotlib, peft or mergekit (each
    costs seconds or hundreds of ms); they load where they are used."""
    import subprocess
    import sys as _sys

    heavy = ("triton", "transformers", "matplotlib", "peft", "mergekit")
    code = ("import sys, torch, fastmerge\n"
            "fastmerge.merge('ties', torch.zeros(8), [torch.ones(8)], density=0.5)\n"
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))\n")
    out = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at start-up: {out.stdout.strip()}"
