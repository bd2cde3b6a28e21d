"""The site's side of a round, shared by every engine: take the broadcast, distill, return the allow-listed offer;
and after the last round, take the final global model.

The only things that leave: the synthetic images and labels and the metadata of synthetic.json (invariant 5).
A broadcast model is written inside the site's output folder and checked against the agreed architecture before use.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from medfdd.artifacts import ArtifactError, load_synthetic
from medfdd.config import SiteConfig
from medfdd.io import atomic_write_bytes
from medfdd.messages import Broadcast, SiteOffer, to_wire
from medfdd.site.distill import distill_site
from medfdd.site.evaluate import EVALUATION_FILE, evaluate_at_site


def make_offer(cfg: SiteConfig, broadcast: Broadcast, *, console: Console | None = None,
               no_dp: bool = False) -> SiteOffer:
    """Distill round `broadcast.round` at this site (matching against the broadcast global model from round 2)."""
    model_path = None
    if broadcast.model is not None:
        model_path = atomic_write_bytes(cfg.output_dir / "received" / f"global-round-{broadcast.round}.safetensors",
                                        broadcast.model)
    distill_site(cfg, round_=broadcast.round, global_model=model_path, no_dp=no_dp, console=console)
    syn = load_synthetic(cfg.output_dir)
    if cfg.audit_gate is not None:  # the site's own audit must pass before anything leaves
        from medfdd.site.gate import gate_synthetic_set

        gate_synthetic_set(cfg, syn, console=console)
    return SiteOffer(site_id=cfg.site_id, round=broadcast.round,
                     arrays={"images": to_wire(syn.images), "labels": to_wire(syn.labels)}, meta=dict(syn.meta))


def receive_final_model(cfg: SiteConfig, final: Broadcast, *, console: Console | None = None) -> Path:
    """The consortium's final global model, after the last round: scored on this site's own scans
    (`medfdd.site.evaluate.evaluate_at_site`, which refuses a model that is not the agreed architecture or holds NaN/Inf)
    and only then kept as output/global_model.safetensors. Nothing is distilled, paid for or sent back."""
    if final.model is None:
        raise ArtifactError(f"{cfg.site_id}: final model", "the coordinator sent no model",
                            "the coordinator must send the run's global_model.safetensors")
    received = atomic_write_bytes(cfg.output_dir / "received" / f"global-final-round-{final.round}.safetensors",
                                  final.model)
    report = evaluate_at_site(cfg, received, console=Console(quiet=True))
    kept = atomic_write_bytes(cfg.output_dir / "global_model.safetensors", final.model)
    if console:
        scores = ", ".join(f"accuracy {r['accuracy']:.3f} on its {g} records" for g, r in report["results"].items())
        console.print(f"{cfg.site_id}: received the final global model ({scores}); kept at {kept}, scores in "
                      f"{cfg.output_dir / EVALUATION_FILE}")
    return kept
