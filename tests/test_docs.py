"""The reference documents stay complete: docs/troubleshooting.md names every error class and every quarantine and
offer rejection code; docs/design.md holds every privacy invariant the code cites by number, states the import
rules the code keeps, and its import table is the code's own (read from the sources, not hand-kept)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from medfdd.coordinator.validate import Reason as OfferReason
from medfdd.data.quarantine import Reason as QuarantineReason

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("medfdd", "privacy")
TROUBLESHOOTING = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
DESIGN = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")


def _sources() -> list[Path]:
    return sorted(p for top in PACKAGES for p in (ROOT / top).rglob("*.py"))


def _base_names(node: ast.ClassDef) -> set[str]:
    return {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases if isinstance(b, ast.Name | ast.Attribute)}


def error_classes() -> set[str]:
    """Every class in medfdd/ and privacy/ that derives, directly or not, from MedfddError (read from the sources)."""
    classes = [n for p in _sources() for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
               if isinstance(n, ast.ClassDef)]
    found = {"MedfddError"}
    while True:
        more = {c.name for c in classes if _base_names(c) & found} - found
        if not more:
            return found
        found |= more


def test_the_error_scan_sees_errors_of_every_layer():  # the completeness test would pass vacuously otherwise
    assert {"ConfigError", "PrivacyError", "BudgetExceeded", "ChargeConflict", "OfferRejected", "CodecError",
            "AuditError"} <= error_classes()


def test_troubleshooting_names_every_error_class():
    missing = sorted(e for e in error_classes() if e != "MedfddError" and f"`{e}`" not in TROUBLESHOOTING)
    assert not missing, f"docs/troubleshooting.md lacks a cause and fix for {missing}"


def test_troubleshooting_names_every_quarantine_and_offer_code():
    for reasons in (QuarantineReason, OfferReason):
        missing = [r.value for r in reasons if f"| `{r.value}` |" not in TROUBLESHOOTING]
        assert not missing, f"docs/troubleshooting.md lacks a row for {missing}"


def _invariants() -> dict[int, str]:
    section = DESIGN.split("## Privacy invariants", 1)[1].split("\n## ", 1)[0]
    return {int(n): text for n, text in re.findall(r"^(\d+)\. (.+)$", section, re.M)}


def test_design_holds_every_invariant_the_code_cites():
    numbers = sorted(_invariants())
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 9, numbers
    cited = set()
    for path in [*_sources(), *sorted((ROOT / "tests").rglob("*.py"))]:
        text = path.read_text(encoding="utf-8")
        for group in re.findall(r"invariants? (\d+(?:(?:, | and |-)\d+)*)", text, re.I):
            bounds = [int(n) for n in re.findall(r"\d+", group)]
            cited |= set(range(bounds[0], bounds[-1] + 1)) if "-" in group else set(bounds)
        cited |= {n for a, b in re.findall(r"DESIGN\.md (\d+)-(\d+)", text) for n in range(int(a), int(b) + 1)}
    assert cited and cited <= set(numbers), sorted(cited - set(numbers))


def _unit(module: str) -> str | None:
    """The package a module belongs to in the layer picture: a sub-package, or a top-level module of medfdd."""
    parts = module.split(".")
    if parts[0] not in PACKAGES or len(parts) < 2:
        return None
    if parts[:3] == ["medfdd", "federation", "flower"]:
        return "medfdd.federation.flower"
    return ".".join(parts[:2])


def import_graph() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for path in _sources():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        src = _unit(module)
        if src is None:  # medfdd/__init__.py, privacy/__init__.py
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            graph[src] |= {u for u in map(_unit, names) if u and u != src}
    return graph


def import_table(graph: dict[str, set[str]]) -> str:
    rows = [f"| `{src}` | {', '.join(f'`{d}`' for d in sorted(graph[src])) or '—'} |" for src in sorted(graph)]
    return "\n".join(["| package | imports |", "|---|---|", *rows])


def test_design_import_table_is_the_codes():
    documented = re.search(r"<!-- import-graph -->\n(.*?)\n<!-- /import-graph -->", DESIGN, re.S)
    assert documented, "docs/design.md lacks its import-graph block"
    expected = import_table(import_graph())
    assert documented.group(1).strip() == expected, f"docs/design.md's import table is stale; paste:\n{expected}"


def test_import_rules_stated_in_design_hold():
    graph = import_graph()
    assert "medfdd.federation" not in set().union(*(d for s, d in graph.items() if s.startswith("privacy.")))
    assert graph["privacy.accounting"] <= {"medfdd.errors", "medfdd.io"}, graph["privacy.accounting"]
    assert "medfdd.federation.flower" in graph  # the scan sees the packages it rules on
