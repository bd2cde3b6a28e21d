"""`medfdd audit RUN_DIR --out audits/reports/NAME`: the privacy officer's command (parser kept import-light)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from privacy.audit.spec import ATTACKS

EXAMPLE = ("medfdd audit consortium/runs/coordinator --out audits/reports/first-run --spec audits/default.yaml\n"
           "  medfdd audit consortium/runs/coordinator --out audits/reports/quick --attacks loss dcr")


def add_audit_parser(sub) -> None:
    au = sub.add_parser(
        "audit", help="membership-inference audit of a run directory: report.json + report.html",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n  " + EXAMPLE,
        description="Run at the site (it reads the real records): for every site with a local config in run.json, "
                    "score the site's training records (members) against its audit holdout (non-members) with "
                    "the selected attacks on the global model and on the site's synthetic set, plus a canary run "
                    "giving an empirical epsilon lower bound next to the accounted epsilon; then the same for the "
                    "consortium. Writes report.json and a self-contained report.html to --out. The spec YAML "
                    "(audits/*.yaml) sets defaults; the flags override it.")
    au.add_argument("run_dir", type=Path, help="run directory written by `medfdd coordinator run`")
    au.add_argument("--out", type=Path, required=True, help="report folder, e.g. audits/reports/NAME")
    au.add_argument("--spec", type=Path, help="audit spec YAML (default: the quick audit, attacks loss, dcr and "
                                              "canary without shadow pipelines; audits/default.yaml runs LiRA too)")
    au.add_argument("--attacks", nargs="+", choices=ATTACKS, help="attacks to run (overrides the spec)")
    au.add_argument("--targets", nargs="+", choices=["global_model", "synthetic"], help="targets (overrides the spec)")
    au.add_argument("--shadows", type=int, help="shadow pipelines for LiRA (overrides the spec)")
    au.add_argument("--canaries", type=_canaries, help="canaries for the one-run audit, a number or 'auto' (enough "
                                                      "for the site's epsilon; overrides the spec)")
    au.add_argument("--fixed-variance", action="store_true", default=None, help="LiRA with one pooled variance")
    au.add_argument("--sites", nargs="+", help="site ids to audit (default: all with a local config)")
    au.add_argument("--seed", type=int, help="audit seed (overrides the spec)")


def _canaries(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None


QUICK_ATTACKS = ("loss", "dcr", "canary")  # no shadow pipelines: minutes, not hours, on a CPU


def _spec_from_args(args):
    from medfdd.config import parse_config
    from privacy.audit.spec import AuditSpec, load_audit_spec

    spec = load_audit_spec(args.spec) if args.spec else AuditSpec(attacks=list(QUICK_ATTACKS))
    overrides = {k: getattr(args, k) for k in ("attacks", "targets", "shadows", "canaries", "fixed_variance",
                                               "sites", "seed") if getattr(args, k, None) is not None}
    if not overrides:
        return spec
    return parse_config({**spec.model_dump(mode="json"), **overrides}, AuditSpec, "medfdd audit flags",
                        spec.base_dir)


def run_audit_command(args, console: Console | None = None) -> int:
    from privacy.audit.run import audit_run
    from privacy.report import write_report

    console = console or Console()
    spec = _spec_from_args(args)
    outcome = audit_run(args.run_dir, spec, console=console)
    js, html = write_report(outcome, args.out)
    table = Table(title=f"audit of {outcome.run['name']}")
    for col in ("site", "attack", "target", "AUC", "TPR@0.1%", "TPR@1%", "eps lower bound", "largest certifiable",
                "eps accounted"):
        table.add_column(col, justify="right")
    for r in outcome.rows:
        table.add_row(r.site, r.attack, r.target, f"{r.metrics.auc:.3f}", f"{r.metrics.tpr_at_fpr_0_001:.3f}",
                      f"{r.metrics.tpr_at_fpr_0_01:.3f}", f"{r.bound.value:.3g}", f"{r.bound.max_certifiable:.3g}",
                      "inf" if math.isinf(r.epsilon_accounted) else f"{r.epsilon_accounted:.3g}")
    console.print(table)
    from privacy.report.build import verdict

    v = verdict(outcome)
    style = {"ok": "green", "leak": "yellow", "violation": "bold red"}[v["level"]]
    console.print(f"[{style}]Verdict: {v['headline']}[/]")
    for n in outcome.notes:
        console.print(f"[yellow]note[/]: {n}")
    console.print(f"wrote {js} and {html}")
    from medfdd.exit_codes import OK, PRIVACY_VIOLATION

    return PRIVACY_VIOLATION if v["level"] == "violation" else OK
