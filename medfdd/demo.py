"""`medfdd demo`: the whole story on bundled data (sklearn digits) in a few minutes on a laptop CPU.

Three hospitals export real DICOM and NIfTI files (non-IID) -> each checks its data -> the coordinator runs one
in-process round: each site distills under DP (epsilon 1), offers are validated and merged, the global model is
trained and evaluated, and goes back to every hospital, which scores it on its own audit holdout -> baselines on
the same split (centralized non-private, local-only) -> membership-inference audit and report. The summary is read
back from the run's own files (run.json, the ledgers, each site's evaluation.json, report.json).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medfdd.config import load_coordinator_config, load_site_config
from medfdd.federation.inprocess import run_inprocess
from medfdd.io import atomic_write_json, json_number
from medfdd.prepare.consortium import prepare_consortium
from medfdd.rundir import RunDir
from medfdd.site.check import check_site
from medfdd.site.evaluate import EVALUATION_FILE

# Small hospitals (~35 images per class): few paid DP steps, each reused for many updates (see README).
SMALL_SITE_DISTILL = {"inner_steps": 10, "lr": 1.0, "width": 32, "batch_size": 256, "allocation": "uniform"}
# The global model is a width-32 ConvNet-3: the audit retrains it in each of its 12 shadow pipelines, and width 64
# took 2.3x as long for 0.03-0.05 more accuracy on two demo runs' merged sets (3 trainings each, README).
DEMO_TRAIN_WIDTH = 32


def run_demo(out: Path, *, sites: int = 3, iterations: int = 10, epsilon: float = 1.0, seed: int = 0,
             train_epochs: int = 100, train_width: int = DEMO_TRAIN_WIDTH, baseline_epochs: int = 30, shadows: int = 4, canaries: int = 32,
             console: Console | None = None) -> dict:
    console = console or Console()
    t0 = time.perf_counter()
    console.rule("[bold]1. three hospitals export their scans (real DICOM and NIfTI files, non-IID)")
    res = prepare_consortium(source="digits", out=out, sites=sites, alpha=0.5, fmt="mixed", seed=seed,
                             epsilon=epsilon, delta=1e-5, ipc=10, iterations=iterations, rounds=1, method="dm",
                             dp=True, console=console)
    res.override(site={"distill": {**SMALL_SITE_DISTILL, "iterations": iterations}},
                 coordinator={"merge": "concat", "train": {"epochs": train_epochs, "width": train_width}})
    checks = {}
    console.rule("[bold]2. each site checks its data (MONAI loading, quarantine, patient-level split)")
    for cfg_path in res.site_configs:
        report = check_site(load_site_config(cfg_path), console=console)
        checks[report.site_id] = {"used": report.n_used, "quarantined": report.n_quarantined}

    console.rule(f"[bold]3. the coordinator runs a round: each site distills under DP (epsilon = {epsilon:g}), "
                 "offers are validated, merged and the global model is trained; each site gets it back and scores "
                 "it on its own patients")
    run_dir = run_inprocess(load_coordinator_config(res.coordinator_config), console=console)

    console.rule("[bold]4. baselines on the same split (they pool real records: for comparison only)")
    from medfdd.baselines import centralized, load_sites, local_only, model_bytes
    from medfdd.nets import convnet_for
    from medfdd.training import TrainSettings

    cfg = load_coordinator_config(res.coordinator_config)
    site_records, test, k = load_sites(cfg)
    settings = TrainSettings(epochs=baseline_epochs, width=cfg.train.width)
    central = centralized(site_records, test, k, settings, seed=seed)
    local = local_only(site_records, test, k, settings, seed=seed)
    fedavg_round_bytes = model_bytes(convnet_for(tuple(test[0].shape[1:]), k, width=cfg.train.width))
    baselines = {"centralized_accuracy": central["accuracy"], "local_only_accuracy": local["accuracy"],
                 "fedavg_bytes_per_site_per_round": 2 * fedavg_round_bytes}
    atomic_write_json(run_dir / "baselines.json", baselines)

    console.rule("[bold]5. the privacy officer's audit (membership inference, canaries)")
    from privacy.audit.run import audit_run
    from privacy.audit.spec import AuditSpec
    from privacy.report.build import write_report

    spec = AuditSpec(shadows=shadows, canaries=canaries, fixed_variance=True, seed=seed)
    report_dir = out / "audit-report"
    write_report(audit_run(run_dir, spec, console=console), report_dir)

    summary = summarize(run_dir, report_dir, checks=checks, site_outputs={
        (c := load_site_config(p)).site_id: c.output_dir for p in res.site_configs})
    summary["seconds"] = time.perf_counter() - t0
    print_summary(summary, console)
    return summary


def summarize(run_dir: Path, report_dir: Path, *, checks: dict | None = None,
              site_outputs: dict[str, Path] | None = None) -> dict:
    """Everything the summary shows, read from the run's own files (and each site's evaluation.json, when given its
    output folder)."""
    run = json.loads(RunDir(run_dir).run_json.read_text())
    baselines = json.loads((run_dir / "baselines.json").read_text())
    report = json.loads((report_dir / "report.json").read_text())
    last = run["rounds"][-1]
    sites = {}
    for sid in run["sites"]:
        ledger = json.loads(RunDir(run_dir).site_ledger(sid).read_text())
        sites[sid] = {"epsilon_spent": json_number(ledger["epsilon_spent"]), "epsilon_budget": json_number(ledger["budget"]["epsilon"]),
                      "bytes_up": sum(r["bytes_up"].get(sid, 0) for r in run["rounds"]),
                      "accepted": sid in last["accepted"], **(checks or {}).get(sid, {})}
        out = (site_outputs or {}).get(sid)
        if out is not None and (out / EVALUATION_FILE).is_file():
            holdout = json.loads((out / EVALUATION_FILE).read_text())["results"].get("holdout")
            sites[sid]["holdout_accuracy"] = None if holdout is None else holdout["accuracy"]
    return {"run_dir": str(run_dir), "accuracy": run["final"]["accuracy"],
            "balanced_accuracy": run["final"]["balanced_accuracy"], "auc": run["final"]["auc"],
            "centralized_accuracy": baselines["centralized_accuracy"],
            "local_only_accuracy": baselines["local_only_accuracy"],
            "fedavg_bytes_per_site_per_round": baselines["fedavg_bytes_per_site_per_round"],
            "rounds": len(run["rounds"]), "sites": sites,
            "verdict": report.get("verdict", {}), "report_html": str(report_dir / "report.html")}


def print_summary(s: dict, console: Console) -> None:
    t = Table(title="medfdd demo: what each hospital spent and shared")
    t.add_column("site", no_wrap=True)  # the values below hold no spaces, so only the headers wrap at 80 columns
    for col in ("scans used", "left out", "epsilon spent / budget", "bytes sent", "FedAvg per round",
                "accuracy on own holdout"):
        t.add_column(col, justify="right")
    for sid, v in s["sites"].items():
        acc = v.get("holdout_accuracy")
        t.add_row(sid, str(v.get("used", "-")), str(v.get("quarantined", "-")),
                  f"{v['epsilon_spent']:.3f}/{v['epsilon_budget']:g}", f"{v['bytes_up']:,}",
                  f"{s['fedavg_bytes_per_site_per_round']:,}", "-" if acc is None else f"{acc:.3f}")
    console.print(t)
    u = Table(title="global model on the coordinator's test split")
    for col in ("model", "accuracy"):
        u.add_column(col, justify="right")
    u.add_row("medfdd: merged DP synthetic sets (epsilon 1 per site)", f"{s['accuracy']:.3f}")
    u.add_row("centralized, all real records pooled (NOT private)", f"{s['centralized_accuracy']:.3f}")
    u.add_row("local-only, each site alone (mean)", f"{s['local_only_accuracy']:.3f}")
    console.print(u)
    v = s["verdict"]
    console.print(f"[bold]audit verdict:[/] {v.get('headline', v) if isinstance(v, dict) else v}")
    console.print(f"privacy officer's report: {s['report_html']}")
    if "seconds" in s:
        console.print(f"demo wall time: {s['seconds']:.0f} s")
