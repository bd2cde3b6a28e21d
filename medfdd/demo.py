"""`medfdd demo`: the whole story on a public image set in under 10 minutes on a 2-core CPU.

Three hospitals export real DICOM and NIfTI files (non-IID) -> each checks its data -> the coordinator runs one
in-process round: each site distills under DP (epsilon 1), offers are validated and merged, the global model is
trained and evaluated, and goes back to every hospital, which scores it on its own audit holdout next to its own two
models (the global model fine-tuned on its training patients, and a local-only one) -> baselines on the same split
(centralized non-private, local-only, DP-FedAvg at the same epsilon) -> membership-inference audit and report. The
summary is read back from the run's own files (run.json, the ledgers, each site's evaluation.json, baselines.json,
report.json).

The data: Fashion-MNIST (Debian's `dataset-fashion-mnist`, which `make demo` installs when run as root) when it is
installed, else scikit-learn's digits, which ship with the install. The digits hospitals hold about 35 images per class:
at that size epsilon 1 costs more than the consortium brings, so the demo says so when it falls back to them.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medfdd.config import load_coordinator_config, load_site_config
from medfdd.errors import SourceUnavailableError
from medfdd.federation.inprocess import run_inprocess
from medfdd.io import atomic_write_json, json_number
from medfdd.prepare.consortium import prepare_consortium
from medfdd.prepare.sources import FASHION_MNIST_INSTALL, find_fashion_mnist
from medfdd.rundir import RunDir
from medfdd.site.check import check_site
from medfdd.site.evaluate import EVALUATION_FILE

BASELINES_FILE = "baselines.json"


@dataclass(frozen=True)
class DemoSetting:
    """Everything the demo sets on top of what `medfdd prepare` writes (3 sites, Dirichlet alpha 0.5, epsilon 1)."""

    source: str
    max_per_class: int | None  # training records per class over all sites (None: every record of the source)
    iterations: int  # paid DP steps per site, in the demo's one round
    distill: dict  # the site configs' `distill` keys
    merge: str  # the coordinator's merge
    train_epochs: int  # the global model's training (and each audit shadow's)
    train_width: int
    site_epochs: int  # each hospital's fine-tuned and local-only model (`evaluate.epochs`)
    baseline_epochs: int  # centralized and local-only baselines
    fedavg: dict = field(default_factory=dict)  # DP-FedAvg baseline: `medfdd.baselines.fedavg` keywords
    shadows: int = 4
    canaries: int | str = 32  # or "auto" (AuditSpec: as many as could certify the round's epsilon, capped by the holdout)
    attacks: tuple[str, ...] | None = None  # the audit's attacks (None: all; without LiRA no shadow pipelines run)


# Small hospitals (~35 images per class): few paid DP steps, each reused for many updates (see README).
SMALL_SITE_DISTILL = {"inner_steps": 10, "lr": 1.0, "width": 32, "batch_size": 256, "allocation": "uniform"}
# The global model is a width-32 ConvNet-3: the audit retrains it in each of its shadow pipelines, and width 64
# took 2.3x as long for 0.03-0.05 more accuracy on two digits demo runs' merged sets (3 trainings each, README).
DEMO_TRAIN_WIDTH = 32

SETTINGS = {
    # 10,000 of the 60,000 training images (1,000 per class) over three hospitals of 2,200-4,700 scans (alpha 0.5,
    # seed 0): a few hundred per class, where epsilon 1 leaves enough signal. Few paid DP steps of 128 expected
    # records, each reused for 20 synthetic updates; images per class shared by the site's noisy class counts and
    # merged by evidence. Each hospital's own models: 10 epochs (300-700 SGD steps at these sizes: fine-tuned above
    # local-only at every hospital, where 5 left it level at the largest; benchmarks/results/demo_site_epochs.json);
    # baselines 15 epochs (B1 trained its 6,000-18,000-record
    # sites for 5). DP-FedAvg: the width-32 recipe tuned on the B1 split (lr 0.2, batch 256), 10 rounds. The audit:
    # the loss attack on the global model, DCR on the synthetic sets and the one-run canary audit (one pipeline per
    # site, with as many canaries as the holdout allows up to what could certify the round's epsilon: they cost the
    # run nothing); LiRA's shadow pipelines (at least two per site, each rerunning distillation and training) would
    # nearly double the demo's time, so `medfdd audit` with a spec of audits/ runs them (benchmarks/results/
    # demo_setting_selection.md)
    "fashion-mnist": DemoSetting(
        source="fashion-mnist", max_per_class=1000, iterations=20,
        distill={"batch_size": 128, "inner_steps": 20, "lr": 3.0, "width": 32, "allocation": "evidence"},
        merge="evidence", train_epochs=100, train_width=DEMO_TRAIN_WIDTH, site_epochs=10, baseline_epochs=15,
        fedavg={"rounds": 10, "local_epochs": 1, "lr": 0.2, "batch_size": 256, "clip": 1.0},
        canaries="auto", attacks=("loss", "dcr", "canary")),
    "digits": DemoSetting(
        source="digits", max_per_class=None, iterations=10, distill=SMALL_SITE_DISTILL,
        merge="concat", train_epochs=100, train_width=DEMO_TRAIN_WIDTH, site_epochs=100, baseline_epochs=30,
        fedavg={"rounds": 10, "local_epochs": 1, "lr": 0.2, "batch_size": 64, "clip": 1.0}),
}


def keep_freed_memory() -> None:
    """Keep freed heap memory in this process (glibc `mallopt`; a no-op elsewhere). glibc's default hands large
    blocks back to the kernel as soon as they are freed, so CPU training, which allocates and frees the same
    activation-sized blocks every step, faults every page back in (the kernel's share of the demo's CPU time:
    benchmarks/results/demo_setting_selection.md). Call it only in a process that is about to train (it holds on to
    up to its peak heap)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return
    if mallopt is not None:  # M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD (glibc's largest)
        for param, value in ((-1, 1 << 30), (-2, 1 << 28), (-3, 1 << 25)):
            mallopt(param, value)


def choose_source(source: str | None = None, *, search_dirs: list[Path | str] | None = None) -> tuple[str, str]:
    """(source, why): Fashion-MNIST where it is installed, else sklearn digits; `source` forces one."""
    if source is not None:
        return source, "asked for"
    try:
        folder = find_fashion_mnist(search_dirs)
    except SourceUnavailableError as e:
        return "digits", (f"Fashion-MNIST is not installed ({e.problem}); sklearn digits ship with medfdd, but their "
                          "hospitals are too small for the private consortium to beat each hospital alone. For the "
                          f"full demo: `sudo make demo-data` (or `{FASHION_MNIST_INSTALL}` as root), then rerun")
    return "fashion-mnist", f"found in {folder}"


def run_demo(out: Path, *, source: str | None = None, overrides: dict | None = None, sites: int = 3,
             epsilon: float = 1.0, seed: int = 0, search_dirs: list[Path | str] | None = None,
             console: Console | None = None) -> dict:
    """`source` None: Fashion-MNIST where installed, else digits (`choose_source`); `overrides` replace fields of
    that source's `SETTINGS` entry (e.g. a smaller run in the tests)."""
    console = console or Console()
    t0 = time.perf_counter()
    source, why = choose_source(source, search_dirs=search_dirs)
    setting = replace(SETTINGS[source], **(overrides or {}))
    console.print(f"[bold]data:[/] {source} ({why})")
    c0 = time.process_time()
    stages: dict[str, float] = {}
    cpu: dict[str, float] = {}  # this process's CPU seconds (all its threads) per stage

    def lap(stage: str) -> None:
        stages[stage] = time.perf_counter() - t0 - sum(stages.values())
        cpu[stage] = time.process_time() - c0 - sum(cpu.values())

    console.rule("[bold]1. three hospitals export their scans (real DICOM and NIfTI files, non-IID)")
    res = prepare_consortium(source=source, out=out, sites=sites, alpha=0.5, fmt="mixed", seed=seed,
                             epsilon=epsilon, delta=1e-5, ipc=10, iterations=setting.iterations, rounds=1,
                             method="dm", dp=True, max_per_class=setting.max_per_class, console=console,
                             search_dirs=search_dirs)
    res.override(site={"distill": {**setting.distill, "iterations": setting.iterations},
                       "evaluate": {"epochs": setting.site_epochs}},
                 coordinator={"merge": setting.merge,
                              "train": {"epochs": setting.train_epochs, "width": setting.train_width}})
    lap("prepare")
    checks = {}
    console.rule("[bold]2. each site checks its data (MONAI loading, quarantine, patient-level split)")
    for cfg_path in res.site_configs:
        report = check_site(load_site_config(cfg_path), console=console)
        checks[report.site_id] = {"used": report.n_used, "quarantined": report.n_quarantined}
    lap("check")

    console.rule(f"[bold]3. the coordinator runs a round: each site distills under DP (epsilon = {epsilon:g}), "
                 "offers are validated, merged and the global model is trained; each site gets it back, scores "
                 "it on its own patients and fine-tunes it on its own training patients")
    cfg = load_coordinator_config(res.coordinator_config)
    run_dir = run_inprocess(cfg, console=console)
    lap("round")

    console.rule("[bold]4. baselines on the same split (they pool real records or share model updates: for "
                 "comparison only)")
    write_baselines(run_dir, cfg, setting, epsilon=epsilon, seed=seed)
    lap("baselines")

    console.rule("[bold]5. the privacy officer's audit (membership inference, canaries)")
    from privacy.audit.run import audit_run
    from privacy.audit.spec import AuditSpec
    from privacy.report.build import write_report

    spec = AuditSpec(shadows=setting.shadows, canaries=setting.canaries, fixed_variance=True, seed=seed,
                     **({} if setting.attacks is None else {"attacks": list(setting.attacks)}))
    report_dir = out / "audit-report"
    write_report(audit_run(run_dir, spec, console=console), report_dir)
    lap("audit")

    summary = summarize(run_dir, report_dir, checks=checks, site_outputs={
        (c := load_site_config(p)).site_id: c.output_dir for p in res.site_configs})
    summary["data"] = {"source": source, "why": why}
    summary["seconds"] = time.perf_counter() - t0
    summary["stage_seconds"] = stages
    summary["cpu_seconds"] = time.process_time() - c0
    summary["stage_cpu_seconds"] = cpu
    print_summary(summary, console)
    return summary


def write_baselines(run_dir: Path, cfg, setting: DemoSetting, *, epsilon: float, seed: int) -> dict:
    """Centralized and local-only (non-private) and DP-FedAvg at the sites' epsilon, on the run's split (each site's
    training patients, the coordinator's test split), at the global model's width; written to baselines.json."""
    from medfdd.baselines import centralized, fedavg, load_sites, local_only, model_bytes
    from medfdd.nets import convnet_for
    from medfdd.training import TrainSettings

    site_records, test, k = load_sites(cfg)
    settings = TrainSettings(epochs=setting.baseline_epochs, width=cfg.train.width)
    cpu: dict[str, float] = {}  # CPU seconds of each baseline

    def timed(name: str, fn, *args, **kwargs) -> dict:
        t = time.process_time()
        out = fn(*args, **kwargs)
        cpu[name] = time.process_time() - t
        return out

    central = timed("centralized", centralized, site_records, test, k, settings, seed=seed)
    local = timed("local_only", local_only, site_records, test, k, settings, seed=seed)
    delta = min(b.delta for b in cfg.consortium.sites.values()) if cfg.consortium else 1e-5
    with warnings.catch_warnings():  # Opacus's note that its noise is not from a secure RNG: a baseline only
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        dp_fedavg = timed("dp_fedavg", fedavg, site_records, test, k, width=cfg.train.width, epsilon=epsilon,
                          delta=delta, seed=seed, **setting.fedavg)
    round_bytes = model_bytes(convnet_for(tuple(test[0].shape[1:]), k, width=cfg.train.width))
    baselines = {"centralized_accuracy": central["accuracy"], "local_only_accuracy": local["accuracy"],
                 "local_only_per_site": local["per_site"], "epochs": setting.baseline_epochs,
                 "dp_fedavg": {"accuracy": dp_fedavg["accuracy"], "epsilon": epsilon, "delta": delta,
                               "epsilon_per_site": dp_fedavg["epsilon_per_site"],
                               "noise_multiplier": dp_fedavg["noise_multiplier"],
                               "accuracy_per_round": dp_fedavg["accuracy_per_round"],
                               "bytes_up_per_site": dp_fedavg["bytes_up_total"] // len(site_records),
                               "settings": {**setting.fedavg, "width": cfg.train.width, "seed": seed}},
                 "fedavg_bytes_per_site_per_round": 2 * round_bytes, "cpu_seconds": cpu}
    atomic_write_json(run_dir / BASELINES_FILE, baselines)
    return baselines


def summarize(run_dir: Path, report_dir: Path, *, checks: dict | None = None,
              site_outputs: dict[str, Path] | None = None) -> dict:
    """Everything the summary shows, read from the run's own files (and each site's evaluation.json, when given its
    output folder)."""
    run = json.loads(RunDir(run_dir).run_json.read_text())
    baselines = json.loads((run_dir / BASELINES_FILE).read_text())
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
            evaluation = json.loads((out / EVALUATION_FILE).read_text())
            for name, key in (("global", "holdout_accuracy"), ("fine_tuned", "fine_tuned_holdout_accuracy"),
                              ("local_only", "local_only_holdout_accuracy")):
                holdout = evaluation.get("models", {}).get(name, {}).get("results", {}).get("holdout")
                sites[sid][key] = None if holdout is None else holdout["accuracy"]
    fed = baselines["dp_fedavg"]
    return {"run_dir": str(run_dir), "accuracy": run["final"]["accuracy"],
            "balanced_accuracy": run["final"]["balanced_accuracy"], "auc": run["final"]["auc"],
            "epsilon": max(v["epsilon_budget"] for v in sites.values()),
            "centralized_accuracy": baselines["centralized_accuracy"],
            "local_only_accuracy": baselines["local_only_accuracy"],
            "dp_fedavg_accuracy": fed["accuracy"], "dp_fedavg_epsilon": fed["epsilon"],
            "dp_fedavg_rounds": fed["settings"]["rounds"], "dp_fedavg_settings": fed["settings"],
            "dp_fedavg_bytes_up_per_site": fed["bytes_up_per_site"],
            "fedavg_bytes_per_site_per_round": baselines["fedavg_bytes_per_site_per_round"],
            "rounds": len(run["rounds"]), "sites": sites,
            "verdict": report.get("verdict", {}), "report_html": str(report_dir / "report.html")}


def _acc(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_summary(s: dict, console: Console) -> None:
    t = Table(title="medfdd demo: what each hospital spent and shared")
    t.add_column("site", no_wrap=True)  # the values below hold no spaces, so only the headers wrap at 80 columns
    for col in ("scans used", "left out", "epsilon spent / budget", "bytes sent", "DP-FedAvg bytes sent"):
        t.add_column(col, justify="right")
    for sid, v in s["sites"].items():
        t.add_row(sid, str(v.get("used", "-")), str(v.get("quarantined", "-")),
                  f"{v['epsilon_spent']:.3f}/{v['epsilon_budget']:g}", f"{v['bytes_up']:,}",
                  f"{s['dp_fedavg_bytes_up_per_site']:,}")
    console.print(t)
    h = Table(title="each hospital's models on its own audit holdout (patients no step used)")
    h.add_column("site", no_wrap=True)
    for col in ("global model", "fine-tuned here", "local-only"):
        h.add_column(col, justify="right")
    for sid, v in s["sites"].items():
        h.add_row(sid, _acc(v.get("holdout_accuracy")), _acc(v.get("fine_tuned_holdout_accuracy")),
                  _acc(v.get("local_only_holdout_accuracy")))
    console.print(h)
    u = Table(title="global model on the coordinator's test split")
    for col in ("model", "accuracy"):
        u.add_column(col, justify="right")
    eps = f"epsilon {s['epsilon']:g} per site"
    u.add_row(f"medfdd: merged DP synthetic sets ({eps})", f"{s['accuracy']:.3f}")
    u.add_row(f"DP-FedAvg, {s['dp_fedavg_rounds']} rounds of DP-SGD ({eps})", f"{s['dp_fedavg_accuracy']:.3f}")
    u.add_row("local-only, each site alone (mean, NOT private)", f"{s['local_only_accuracy']:.3f}")
    u.add_row("centralized, all real records pooled (NOT private)", f"{s['centralized_accuracy']:.3f}")
    console.print(u)
    if "data" in s:
        console.print(f"data: {s['data']['source']} ({s['data']['why']})")
    v = s["verdict"]
    console.print(f"[bold]audit verdict:[/] {v.get('headline', v) if isinstance(v, dict) else v}")
    console.print(f"privacy officer's report: {s['report_html']}")
    if "seconds" in s:
        cpu = "".join(f", {k} {v:.0f}" for k, v in s.get("stage_cpu_seconds", {}).items())
        console.print(f"demo wall time: {s['seconds']:.0f} s" + (f" (CPU {s['cpu_seconds']:.0f} s{cpu})"
                                                                   if "cpu_seconds" in s else ""))

