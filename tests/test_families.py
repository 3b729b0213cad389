"""The family registry: registration, lookup, refusal, and the layering rule of `families/`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from torch import nn

import mpdeploy.families as families
from mpdeploy.errors import UserError
from mpdeploy.families import Family, get_family, register_family, registered_families

PACKAGE = Path(families.__file__).parent


def test_builtin_families_are_registered_once_with_names_and_examples():
    names = [f.name for f in registered_families()]
    assert len(names) == len(set(names))
    modules = {type(f).__module__.rsplit(".", 1)[1] for f in registered_families()}
    assert set(families.BUILTIN_FAMILY_MODULES) <= modules
    for family in registered_families():
        assert family.examples, family.name


def test_register_family_refuses_a_second_class_under_the_same_name():
    existing = registered_families()[0]

    class Duplicate(Family):
        name = existing.name

    with pytest.raises(ValueError, match="registered twice"):
        register_family(Duplicate)
    assert {f.name: f for f in registered_families()}[existing.name] is existing


def test_unknown_model_is_refused_naming_every_registered_family():
    with pytest.raises(UserError) as info:
        get_family(nn.Sequential(nn.Linear(4, 4)))
    message = str(info.value)
    assert "\n" not in message
    for family in registered_families():
        assert family.name in message


def test_families_imports_neither_models_nor_prune():
    """`families/` knows models, not matrices: no import of models/, prune/ or mp/ (the layering)."""
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                assert not target.startswith(
                    ("mpdeploy.models", "mpdeploy.prune", "mpdeploy.mp")
                ), f"{path.name} imports {target}"
