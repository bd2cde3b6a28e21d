"""docs/reliability.md is generated from the tests' case tables and must match them (`make reliability-table`)."""

from __future__ import annotations

import reliability_table as table


def test_every_row_names_a_test_that_exists():
    missing = [f"{f}::{t}" for f, t in table.referenced_tests() if not table.defines(f, t)]
    assert missing == []


def test_the_table_covers_the_issue():
    assert len(table.bad_input_rows()) >= 30
    assert len(table.fault_rows()) >= 10 and len(table.hostile_rows()) >= 30 and len(table.security_rows()) >= 2


def test_committed_table_matches_the_tests():
    assert table.OUTPUT.read_text() == table.render(), "docs/reliability.md is stale: run `make reliability-table`"
