"""B3 leakage: membership inference against the global model and the synthetic sets at epsilon {1, 10, inf}, with
the empirical epsilon lower bounds next to the accounted epsilon (shared/BENCHMARKS.md, B3).

Whole pipeline per epsilon: `prepare_consortium` (digits or Fashion-MNIST, K hospitals, half of each site kept as the audit holdout)
-> in-process coordinator run (`run_inprocess`, --no-dp for inf) -> `audit_run` (loss, DCR, LiRA online/offline
with S shadow pipelines on both targets, canary one-run audit). The configuration is the small-site worst case of
the power test (ipc close to the records per class, no feature centring or augmentation, global model trained 300
epochs without augmentation), so the non-private run leaks as much as this pipeline can.

Run: `.venv/bin/python benchmarks/b3_leakage.py [--source digits|fashion-mnist] [--eps 1 10 inf] [--shadows 16]`; then
`.venv/bin/python benchmarks/report.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, peak_memory_mb, write_result  # noqa: E402

from medfdd.config import load_coordinator_config
from medfdd.federation.inprocess import run_inprocess  # noqa: E402
from medfdd.prepare.consortium import prepare_consortium  # noqa: E402
from privacy.audit.run import audit_run  # noqa: E402
from privacy.audit.spec import AuditSpec  # noqa: E402
from privacy.report import write_report  # noqa: E402
from privacy.report.build import row_json  # noqa: E402

DISTILL = {"ipc": 4, "iterations": 100, "inner_steps": 10, "augment": False, "center": False, "width": 32,
           "batch_size": 256}
TRAIN = {"epochs": 300, "width": 32, "augment": False}
# `--setting utility`: sites large enough for a useful DP model, medfdd's own defaults (feature centring,
# augmentation in distillation and training), the CPU-scale batch of 128 records per class and ipc 10
UTILITY_DISTILL = {"ipc": 10, "iterations": 100, "inner_steps": 10, "width": 32, "batch_size": 1280}
UTILITY_TRAIN = {"epochs": 300, "width": 32}
SETTINGS = {"worst-case": (DISTILL, TRAIN), "utility": (UTILITY_DISTILL, UTILITY_TRAIN)}
DELTA = 1e-5
REPORTS = Path(__file__).resolve().parents[1] / "audits" / "reports" / "b3"  # git-ignored


def run_one(eps: float, *, args, work: Path, console: Console) -> dict:
    dp = math.isfinite(eps)
    base = work / f"eps-{eps:g}"
    distill, train = SETTINGS[args.setting]
    res = prepare_consortium(source=args.source, out=base, sites=args.sites, alpha=args.alpha, fmt="dicom",
                             seed=args.seed, epsilon=eps if dp else 1.0, delta=DELTA, ipc=distill["ipc"],
                             iterations=distill["iterations"], rounds=1, method="dm", dp=True, max_per_class=args.max_per_class,
                             console=Console(quiet=True))
    # stratified: the same class mix among members and non-members (the design of the results so far)
    res.override(site={"data": {"holdout_fraction": 0.5, "split": "stratified"}, "device": "cpu",
                       "distill": distill}, coordinator={"train": train})
    t0 = time.perf_counter()
    run_dir = run_inprocess(load_coordinator_config(res.coordinator_config), console=Console(quiet=True), no_dp=not dp)
    run_s = time.perf_counter() - t0
    spec = AuditSpec(attacks=args.attacks, shadows=args.shadows, canaries=args.canaries, seed=args.seed)
    t0 = time.perf_counter()
    outcome = audit_run(run_dir, spec, console=console)
    audit_s = time.perf_counter() - t0
    if args.keep_reports:
        write_report(outcome, REPORTS / args.source / f"eps-{eps:g}")
    final = json.loads((run_dir / "run.json").read_text())["final"] or {}
    row = {"epsilon": eps if dp else "inf", "delta": DELTA,
           "epsilon_accounted": {s: ("inf" if math.isinf(a.epsilon_spent) else a.epsilon_spent)
                                 for s, a in outcome.sites.items()},
           "accuracy": final.get("accuracy"), "n_members": {s: a.n_members for s, a in outcome.sites.items()},
           "n_nonmembers": {s: a.n_nonmembers for s, a in outcome.sites.items()},
           "run_seconds": run_s, "audit_seconds": audit_s, "results": [row_json(r) for r in outcome.rows]}
    for r in row["results"]:
        console.print(f"eps {eps:g} {r['site']:>12} {r['attack']:>12} {r['target']:>12} auc {r['auc']:.3f} "
                      f"tpr@0.1% {r['tpr_at_fpr_0.001']:.3f} lb {r['epsilon_lower_bound']} "
                      f"acc {r['epsilon_accounted']}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 10.0, math.inf])
    ap.add_argument("--shadows", type=int, default=16)
    ap.add_argument("--canaries", type=int, default=64)
    ap.add_argument("--source", choices=["digits", "fashion-mnist"], default="digits")
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=100.0, help="Dirichlet alpha (large = near-IID small sites)")
    ap.add_argument("--max-per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="worst-case",
                    help="worst-case: tiny sites, no augmentation (the power test's design); utility: larger sites "
                    "and medfdd's distillation defaults")
    ap.add_argument("--attacks", nargs="+", default=["loss", "dcr", "lira_online", "lira_offline", "canary"])
    ap.add_argument("--name", default=None, help="results file name (default b3_leakage_<source>)")
    ap.add_argument("--keep-reports", action="store_true",
                    help="also write report.html/json per epsilon under audits/reports/b3/ (git-ignored)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    console = Console()
    suffix = "" if args.setting == "worst-case" else f"_{args.setting}"
    args.name = args.name or f"b3_leakage_{args.source.replace('-', '_')}{suffix}"
    rows = []
    partial = RESULTS / f"{args.name}.partial.jsonl"
    with tempfile.TemporaryDirectory(prefix="b3-") as tmp:
        for eps in args.eps:
            row = run_one(eps, args=args, work=Path(tmp), console=console)
            rows.append(row)
            with open(partial, "a") as f:
                f.write(json.dumps(row) + "\n")
    dataset = {"digits": "digits (sklearn load_digits, 16x16)",
               "fashion-mnist": "fashion-mnist (Debian dataset-fashion-mnist, 28x28)"}[args.source]
    out = write_result(args.name, {
        "dataset": dataset, "partition": {"sites": args.sites, "alpha": args.alpha, "seed": args.seed,
                                          "max_per_class": args.max_per_class, "holdout_fraction": 0.5,
                                          "split": "stratified"},
        "method": "dm", "setting": args.setting, "distill": SETTINGS[args.setting][0],
        "train": SETTINGS[args.setting][1], "shadows": args.shadows, "canaries": args.canaries,
        "attacks": args.attacks,
        "confidence": 0.95, "rows": rows, "peak_memory_mb": peak_memory_mb()})
    partial.unlink(missing_ok=True)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
