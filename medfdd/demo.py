"""`medfdd demo`: the story so far on bundled data (sklearn digits), in a few minutes on a laptop CPU.

Three hospitals as real DICOM files (non-IID) -> `site check` at each -> private distillation at each (eps 1) ->
the budget each spent. Later steps (coordinator, audit) join as they land.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from medfdd.artifacts import load_synthetic
from medfdd.config import load_site_config
from medfdd.data.check import check_site
from medfdd.data.prepare import prepare_consortium
from medfdd.distill.site import distill_site

# Small hospitals (~35 images per class): few paid DP steps, each reused for many updates (see README).
SMALL_SITE_DISTILL = {"inner_steps": 10, "lr": 1.0, "width": 32}


def run_demo(out: Path, *, sites: int = 3, iterations: int = 10, epsilon: float = 1.0, seed: int = 0,
             console: Console | None = None) -> dict:
    console = console or Console()
    console.rule("[bold]1. three hospitals export their scans (real DICOM files, non-IID)")
    res = prepare_consortium(source="digits", out=out, sites=sites, alpha=0.5, fmt="dicom", seed=seed,
                             epsilon=epsilon, delta=1e-5, ipc=10, iterations=iterations, method="dm", dp=True,
                             console=console)
    for cfg_path in res.site_configs:
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["distill"].update(SMALL_SITE_DISTILL)
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    summary = {"sites": {}}
    console.rule("[bold]2. each site checks its data (MONAI loading, quarantine, patient-level split)")
    for cfg_path in res.site_configs:
        report = check_site(cfg_path, console=console)
        summary["sites"][report.site_id] = {"used": report.n_used, "quarantined": report.n_quarantined}
    console.rule(f"[bold]3. each site distills under differential privacy (epsilon = {epsilon:g} per site)")
    for cfg_path in res.site_configs:
        outcome = distill_site(cfg_path, console=console)
        cfg = load_site_config(cfg_path)
        syn = load_synthetic(cfg.output_dir)
        summary["sites"][cfg.site_id].update(epsilon=outcome.meta["epsilon"], images=len(syn.labels),
                                             bytes=(cfg.output_dir / "synthetic.npz").stat().st_size,
                                             preview=str(cfg.output_dir / "synthetic_preview.png"))
    table = Table(title="what each hospital did")
    for col in ("site", "scans used", "quarantined", "epsilon spent", "synthetic images", "bytes to share"):
        table.add_column(col, justify="right")
    for sid, s in summary["sites"].items():
        table.add_row(sid, str(s["used"]), str(s["quarantined"]), f"{s['epsilon']:.3f} / {epsilon:g}",
                      str(s["images"]), f"{s['bytes']:,}")
    console.print(table)
    for sid, s in summary["sites"].items():
        console.print(f"{sid}: synthetic images preview {s['preview']}")
    return summary
