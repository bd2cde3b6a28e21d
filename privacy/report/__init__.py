"""Audit reports: report.json (contract fields per attack) and a self-contained report.html."""

from privacy.report.build import report_json, verdict, write_report

__all__ = ["report_json", "verdict", "write_report"]
