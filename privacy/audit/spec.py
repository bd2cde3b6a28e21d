"""Audit specs (`audits/*.yaml`): which attacks, how many shadow pipelines and canaries, at what confidence.

Validated like the site configs (pydantic v2, unknown keys are errors naming the key), e.g.::

    attacks: [loss, lira_online, lira_offline, dcr, canary]
    targets: [global_model, synthetic]
    shadows: 8
    fixed_variance: false
    canaries: auto                # or a number m; auto: enough for the site's epsilon (capped by its holdout)
    canary_kind: holdout          # holdout | mislabeled
    canary_target: synthetic      # synthetic | global_model
    confidence: 0.95
    sites: null                   # null = every site of the run with a local config
    consortium: true
    seed: 0
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medfdd.config import AttackName as Attack
from medfdd.config import load_yaml, parse_config

ATTACKS: tuple[str, ...] = get_args(Attack)
Target = Literal["global_model", "synthetic"]


class AuditSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    attacks: list[Attack] = Field(default_factory=lambda: list(ATTACKS), min_length=1,
                                  description="loss | lira_online | lira_offline | dcr | canary")
    targets: list[Target] = Field(default_factory=lambda: ["global_model", "synthetic"], min_length=1,
                                  description="global_model (loss, LiRA) and/or synthetic (DCR, LiRA on DCR)")
    shadows: int = Field(8, ge=2, le=1024, description="shadow pipelines for LiRA (>= 16 where affordable)")
    fixed_variance: bool = Field(False, description="LiRA with one pooled variance (better with few shadows)")
    canaries: int | Literal["auto"] = Field(
        "auto", description="canaries m (capped by the site's holdout size); auto: the fewest whose one-run bound "
        "could reach 1.5 x the round's epsilon (`metrics.canaries_for`), the whole holdout when none could")
    canary_kind: Literal["holdout", "mislabeled"] = "holdout"
    canary_target: Target = "synthetic"
    confidence: float = Field(0.95, gt=0.5, lt=1, description="confidence of the epsilon lower bounds")
    sites: list[str] | None = Field(None, description="site ids to audit (default: all with a local config)")
    consortium: bool = Field(True, description="also audit the global model on all audited sites' records")
    seed: int = Field(0, ge=0)
    base_dir: Path = Field(Path("."), exclude=True)

    @field_validator("attacks", "targets")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({a for a in v if v.count(a) > 1})
        if dup:
            raise ValueError(f"listed twice: {dup}")
        return v

    @field_validator("canaries")
    @classmethod
    def _enough_canaries(cls, v: int | str) -> int | str:
        if v != "auto" and v < 4:
            raise ValueError(f"{v} canaries: need at least 4 (or auto)")
        return v

    @model_validator(mode="after")
    def _every_attack_runs(self) -> AuditSpec:
        """An attack listed without the target it scores would silently not run: refuse it."""
        needs = {"loss": "global_model", "dcr": "synthetic"}
        idle = [f"{a} needs target {needs[a]}" for a in self.attacks if a in needs and needs[a] not in self.targets]
        if idle:
            raise ValueError(f"these attacks would not run: {'; '.join(idle)} (targets: {self.targets}); add the "
                             "target or drop the attack")
        return self

    @property
    def lira(self) -> list[str]:
        return [a for a in self.attacks if a.startswith("lira")]


def load_audit_spec(path: Path | str | None) -> AuditSpec:
    if path is None:
        return AuditSpec()
    path = Path(path)
    return parse_config(load_yaml(path), AuditSpec, str(path), path.resolve().parent)
