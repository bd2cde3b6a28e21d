"""The coordinator's run directory, spelled in one place: the coordinator writes it; the audit, the demo and the
deployment commands read it.

    OUTPUT/
      run.json                     every round's outcome (rewritten atomically after each round)
      checkpoint.json              what a killed coordinator resumes from
      progress.png                 test accuracy and each site's epsilon per round (redrawn after each round)
      merged.npz                   the set the global model was last trained on
      global_model.safetensors     the run's global model
      warm_start_model.safetensors hybrid mode: the model the fine-tuning rounds started from
      rounds/round-R/              merged.npz, global_model.safetensors, sites/SITE/synthetic.{npz,json}
      finetune/round-K/            global_model.safetensors, sites/SITE.safetensors (the sites' DP updates)
      sites/SITE/                  the site's latest release and (in-process) a copy of its privacy ledger
      bundle/                      the final global model as a MONAI bundle (medfdd.coordinator.bundle)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODEL = "global_model.safetensors"
MERGED = "merged.npz"
LEDGER = "privacy_ledger.json"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.json"

    @property
    def progress(self) -> Path:
        return self.root / "progress.png"

    @property
    def merged(self) -> Path:
        return self.root / MERGED

    @property
    def global_model(self) -> Path:
        return self.root / MODEL

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def warm_start_model(self) -> Path:
        return self.root / "warm_start_model.safetensors"

    def round(self, r: int) -> Path:
        return self.root / "rounds" / f"round-{r}"

    def round_merged(self, r: int) -> Path:
        return self.round(r) / MERGED

    def round_model(self, r: int) -> Path:
        return self.round(r) / MODEL

    def round_release(self, r: int, site: str) -> Path:
        """Folder of `site`'s synthetic set as released in round `r`."""
        return self.round(r) / "sites" / site

    def finetune_model(self, k: int) -> Path:
        return self.root / "finetune" / f"round-{k}" / MODEL

    def finetune_update(self, k: int, site: str) -> Path:
        return self.root / "finetune" / f"round-{k}" / "sites" / f"{site}.safetensors"

    def site(self, site: str) -> Path:
        """Folder of `site`'s latest release and ledger copy."""
        return self.root / "sites" / site

    def site_ledger(self, site: str) -> Path:
        return self.site(site) / LEDGER
