"""The reference documents stay complete: docs/troubleshooting.md names every error class and every quarantine and
offer rejection code; docs/design.md holds every privacy invariant the code cites by number, states the import
rules the code keeps, and its import table is the code's own (read from the sources, not hand-kept)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from import_layers import layer_table

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


def test_design_layer_table_is_the_codes():
    documented = re.search(r"<!-- layers -->\n(.*?)\n<!-- /layers -->", DESIGN, re.S)
    assert documented, "docs/design.md lacks its layers block"
    expected = layer_table()
    assert documented.group(1).strip() == expected, f"docs/design.md's layer table is stale; paste:\n{expected}"
