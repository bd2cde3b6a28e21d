"""`medfdd site budget` and the site's privacy ledger: opened only where no earlier charge left a trace (a lost
ledger is never a fresh budget, `LedgerMissing`), a noise key installed the supported way, spent and remaining
epsilon per charge (recomputed by the accountant; nothing is charged here) and their chart."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medfdd.charts import budget_png
from medfdd.config import SiteConfig
from medfdd.data.split import MEMBERS_FILE
from medfdd.io import atomic_write_bytes, write_error
from medfdd.site.noise_key import KEY_FILENAME
from medfdd.site.record_count import COUNT_FILE
from privacy.accounting import LEDGER_FILENAME, PrivacyLedger, check_not_lost, epsilon_for

BUDGET_CHART = "budget.png"
# written at a site only after a charge is on its ledger (artifacts, members.json, the paid record count)
RELEASE_FILES = ("synthetic.npz", "synthetic.json", "synthetic_preview.png", "synthetic.nii.gz", MEMBERS_FILE,
                 COUNT_FILE)


def release_traces(cfg: SiteConfig) -> list[Path]:
    """Paths whose presence shows that this output folder's ledger has charged before (existing or not): released
    artifacts and the site's copies of them, resumable checkpoints, members.json, the
    paid record count, and the noise key (created only after the ledger exists: a key without a ledger means the
    ledger was lost, or a key was copied into a folder whose ledger it does not belong to; either way its noise may
    already have been spent)."""
    out = cfg.output_dir
    return ([out / name for name in (*RELEASE_FILES, KEY_FILENAME)]
            + sorted((out / "checkpoints").glob("*round-*.safetensors")))


def provision_noise_key(cfg: SiteConfig, key: bytes, *, dp: bool = True) -> Path:
    """Install a site's noise key from a backup or a key store into a NEW output folder: the (empty) ledger is
    created first, so the key belongs to this ledger from the start (a key found without its ledger is refused)."""
    open_ledger(cfg, dp)
    path = cfg.output_dir / KEY_FILENAME
    atomic_write_bytes(path, key)
    path.chmod(0o600)
    return path


def open_ledger(cfg: SiteConfig, dp: bool) -> PrivacyLedger:
    """The site's ledger; a missing one is created only where no earlier charge left a trace (`LedgerMissing`). It is
    opened before the noise key is created, so a first run that stops in between leaves a ledger with its key."""
    path = cfg.output_dir / LEDGER_FILENAME
    try:
        return PrivacyLedger.open(path, site_id=cfg.site_id, epsilon=cfg.privacy.epsilon if dp else math.inf,
                                  delta=cfg.privacy.delta, accountant=cfg.privacy.accountant, unit=cfg.privacy.unit,
                                  traces=release_traces(cfg))
    except OSError as e:  # the output folder cannot be created or locked (a file in the way, read-only, disk full)
        raise write_error(path, e) from e


def print_budget(cfg: SiteConfig, console: Console | None = None) -> dict:
    """`medfdd site budget`: spent and remaining epsilon, per round, from the ledger (nothing is charged), and
    output/budget.png: epsilon after each charge by purpose against the budget (`chart`: its path; None without a
    ledger)."""
    console = console or Console()
    path = cfg.output_dir / LEDGER_FILENAME
    if not path.is_file():
        check_not_lost(path, release_traces(cfg))  # a lost ledger is not "nothing spent"
        console.print(f"{cfg.site_id}: no ledger yet ({path}); budget epsilon = {cfg.privacy.epsilon:g}, "
                      f"delta = {cfg.privacy.delta:g}, nothing spent")
        return {"site_id": cfg.site_id, "spent": 0.0, "budget": cfg.privacy.epsilon, "rounds": [], "chart": None}
    ledger = PrivacyLedger.load(path)
    table = Table(title=f"{cfg.site_id}: privacy ledger ({ledger.budget.accountant.upper()}, "
                        f"delta = {ledger.budget.delta:g}, epsilon protects each {ledger.budget.unit})")
    for col in ("round", "purpose", "noise multiplier", "sample rate", "steps", "eps after", "remaining"):
        table.add_column(col, justify="right")
    rows, so_far = [], []
    for e in ledger.entries:
        so_far.append(e)
        spent = epsilon_for(so_far, delta=ledger.budget.delta, accountant=ledger.budget.accountant)
        remaining = ledger.budget.epsilon - spent
        rows.append({"round": e.round, "purpose": e.purpose, "epsilon_after": spent, "remaining": remaining})
        table.add_row(str(e.round), e.purpose, f"{e.noise_multiplier:.4g}", f"{e.sample_rate:.4g}", str(e.steps),
                      f"{spent:.4g}", f"{remaining:.4g}")
    console.print(table)
    console.print(f"spent {ledger.epsilon_spent:.4g} of {ledger.budget.epsilon:g}; remaining {ledger.remaining:.4g}")
    chart = atomic_write_bytes(cfg.output_dir / BUDGET_CHART, budget_png(
        rows, ledger.budget.epsilon, f"{cfg.site_id}: epsilon spent after each charge (per {ledger.budget.unit})"))
    console.print(f"chart: {chart}")
    return {"site_id": cfg.site_id, "spent": ledger.epsilon_spent, "budget": ledger.budget.epsilon, "rounds": rows,
            "chart": str(chart)}
