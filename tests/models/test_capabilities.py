"""The capability table cannot lie: every cell it marks "exact" is backed by a test that
checks that operation against an independent reference, and the README's table is the
one the code produces.

A test backs a cell by carrying ``@pytest.mark.reference("Class", "operation", "against")``
(directly or on a ``pytest.param``); this file reads those markers from the test modules
of ``tests/models/`` (by importing them, so deselecting tests cannot hide a missing check).
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

import genprog as gp
from genprog.models import REGISTRY, ZooModel
from genprog.models.base import OPERATIONS

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _marks_of(obj):
    """Every mark on a test function or class, including marks of ``pytest.param``
    entries inside its ``parametrize`` marks."""
    for mark in getattr(obj, "pytestmark", []):
        yield mark
        if mark.name == "parametrize" and len(mark.args) >= 2:
            for value in mark.args[1]:
                yield from getattr(value, "marks", ())


def _reference_markers() -> dict[tuple[str, str], list[str]]:
    """(class, operation) -> ["file::test (against)"] from every zoo test module (imported,
    not run, so deselecting tests cannot hide a missing check)."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted((ROOT / "tests" / "models").glob("test_*.py")):
        if path.name == pathlib.Path(__file__).name:
            continue
        spec = importlib.util.spec_from_file_location(f"_capability_scan_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, obj in vars(module).items():
            if not name.startswith("test") and not name.startswith("Test"):
                continue
            members = [obj] + ([m for m in vars(obj).values() if callable(m)]
                               if isinstance(obj, type) else [])
            for member in members:
                for mark in _marks_of(member):
                    if mark.name != "reference":
                        continue
                    args = mark.args
                    if len(args) != 3 or not all(isinstance(a, str) and a for a in args):
                        raise AssertionError(f"{path.name}::{name}: reference marker needs three "
                                             "non-empty strings (class, operation, against)")
                    cls, op, against = args
                    found.setdefault((cls, op), []).append(f"{path.name}::{name} ({against})")
    return found


MARKERS = _reference_markers()


def _exact_cells():
    import genprog.models  # noqa: F401  (registers every class)

    return [(name, op) for name, cls in sorted(REGISTRY.items())
            for op, kind in cls.capabilities().items() if kind == "exact" and op != "sample"]


@pytest.mark.parametrize("cls,op", _exact_cells())
def test_every_exact_cell_is_checked_against_a_reference(cls, op):
    assert (cls, op) in MARKERS, (
        f"{cls}.{op} is reported exact but no test carries "
        f'@pytest.mark.reference("{cls}", "{op}", ...)'
    )


def test_markers_name_real_classes_and_operations():
    import genprog.models  # noqa: F401

    for (cls, op), where in MARKERS.items():
        assert cls in REGISTRY, f"reference marker for unknown class {cls!r}: {where}"
        assert op in OPERATIONS, f"reference marker for unknown operation {op!r}: {where}"


def test_capability_cells_follow_the_overrides():
    class _Plain(ZooModel):
        register = False

    class _WithLogProb(_Plain):
        register = False

        def _log_prob_rows(self, y):  # pragma: no cover - never called
            raise AssertionError

    plain, exact = _Plain.capabilities(), _WithLogProb.capabilities()
    assert plain["log_prob"] == "generic" and plain["log_marginal"] == "estimated"
    assert plain["marginalize"] == "unavailable" and plain["mle"] == "unavailable"
    assert exact["log_prob"] == "exact" and exact["log_marginal"] == "exact"
    assert "_Plain" not in REGISTRY and "_WithLogProb" not in REGISTRY


def test_gp_capabilities_lists_every_class():
    table = gp.capabilities()
    assert list(table.columns) == list(OPERATIONS)
    assert set(REGISTRY) <= set(table.index)
    assert table.loc["Model (any Pyro story)", "sample"] == "exact"


def test_readme_table_is_the_generated_one():
    from genprog.models.table import markdown_table

    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, (
        "README's capability table is stale: regenerate it with "
        "`python -m genprog.models.table` and paste it"
    )
