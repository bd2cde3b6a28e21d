"""Every data-dependent channel outside epsilon (privacy.report.channels) is listed in the audit report and in the
privacy officer's guide, with the neighbouring relation and the unit (issue 36, item 6)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from test_report_html import outcome

from medfdd.config import PrivacyConfig
from medfdd.federation.failures import FailureCode
from privacy.accounting import PRIVACY_UNITS
from privacy.report import write_report
from privacy.report.channels import (
    CHANNELS,
    DEFAULT_UNIT,
    FAILURE_CODES,
    GROUPS,
    HEADING,
    NEIGHBOURING,
    channels_markdown,
)

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "privacy-officer.md"


def test_the_report_lists_every_channel_with_its_size(tmp_path):
    run = outcome(shift=0.0, dp=True)
    next(iter(run.sites.values())).privacy_unit = "patient"
    js, page = write_report(run, tmp_path)
    scope = json.loads(js.read_text())["outside_epsilon"]
    assert [c["name"] for c in scope["channels"]] == [c.name for c in CHANNELS]
    assert all(c["size"] and c["depends_on"] and c["mitigation"] for c in scope["channels"])
    assert scope["neighbouring"] == {u: NEIGHBOURING[u] for u in ("patient", "scan")}  # the units of this run
    text = page.read_text()
    assert "What epsilon covers, and what leaves outside it" in text
    for c in CHANNELS:
        assert all(html.escape(x) in text for x in (c.name, c.depends_on, c.size, c.mitigation)), c.name
    assert all(html.escape(case) in text for case, _ in GROUPS)


def test_the_guide_section_is_the_rendered_list():
    section = channels_markdown()
    assert section.startswith(HEADING) and section in GUIDE.read_text()
    assert "add or remove one scan" in section and "add or remove one patient" in section
    assert all(f"`privacy.unit: {u}`" in section for u in NEIGHBOURING)
    assert all(f"| {c.name} |" in section for c in CHANNELS)
    failure = next(c for c in CHANNELS if c.name == "failure code")
    assert all(code.value in failure.size for code in FailureCode)  # the fixed set is named in full


def test_the_list_names_the_codes_and_units_the_code_uses():
    assert FAILURE_CODES == tuple(c.value for c in FailureCode)
    assert DEFAULT_UNIT == PrivacyConfig.model_fields["unit"].default
    assert set(NEIGHBOURING) == set(PRIVACY_UNITS)
