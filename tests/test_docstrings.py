"""Every public name has a docstring with an ``Example:`` section; public methods of the
public classes have a docstring. Public: ``velcro.__all__`` and each stage package's."""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = [
    "velcro", "velcro.graph", "velcro.trim", "velcro.search", "velcro.report",
    "velcro.report.sweep", "velcro.hardware", "velcro.hardware.kernels", "velcro.distributed",
    "velcro.data", "velcro.models", "velcro.demo",
]


def public_callables():
    for package in PACKAGES:
        module = importlib.import_module(package)
        assert hasattr(module, "__all__"), f"{package} declares no __all__"
        for name in module.__all__:
            value = getattr(module, name)
            if callable(value) and not inspect.ismodule(value):
                yield f"{package}.{name}", value


def own_methods(cls):
    """Public functions and properties the class defines itself (not inherited ones, not
    dataclass-generated ones)."""
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value):
            yield name, value


CALLABLES = dict(public_callables())


@pytest.mark.parametrize("name", sorted(CALLABLES))
def test_public_name_has_a_docstring_with_an_example(name):
    doc = inspect.getdoc(CALLABLES[name]) or ""
    assert doc.strip(), f"{name} has no docstring"
    assert "\nExample:\n" in f"\n{doc}", f"{name}'s docstring has no 'Example:' section"
    example = doc.split("Example:", 1)[1]
    assert ">>>" in example, f"{name}'s example shows no code"


@pytest.mark.parametrize("name", sorted(n for n, v in CALLABLES.items() if inspect.isclass(v)))
def test_public_methods_have_docstrings(name):
    cls = CALLABLES[name]
    missing = [method for method, function in own_methods(cls)
               if not (inspect.getdoc(function) or "").strip()]
    assert not missing, f"{name}: no docstring on {', '.join(missing)}"


def test_the_check_covers_the_pipeline():
    for name in ("velcro.calibrate", "velcro.Plan", "velcro.trim.trim", "velcro.data.ImageFolder",
                 "velcro.search.SearchResult", "velcro.report.write_report"):
        assert name in CALLABLES
