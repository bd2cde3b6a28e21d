"""The `medfdd` command line: prepare, site {check,distill,budget}, coordinator run, audit, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from medfdd.errors import MedfddError

EXAMPLES = {
    "prepare": "medfdd prepare --source digits --sites 3 --alpha 0.5 --format dicom --out consortium --seed 0",
    "site check": "medfdd site check consortium/site_configs/hospital-a.yaml",
    "site distill": "medfdd site distill consortium/site_configs/hospital-a.yaml --round 1",
    "site budget": "medfdd site budget consortium/site_configs/hospital-a.yaml",
    "site evaluate": "medfdd site evaluate consortium/site_configs/hospital-a.yaml "
                     "--model consortium/runs/hospital-a/global_model.safetensors",
    "coordinator run": "medfdd coordinator run consortium/site_configs/coordinator.yaml",
}


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="medfdd", formatter_class=fmt,
        description="Federated dataset distillation for hospitals under differential privacy.",
        epilog="example:\n  " + "\n  ".join(EXAMPLES.values()))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pr = sub.add_parser("prepare", help="materialise a non-IID consortium of site folders from a labelled source",
                        formatter_class=fmt, epilog="example:\n  " + EXAMPLES["prepare"],
                        description="Write K hospital folders of real DICOM or NIfTI files (+ labels.csv), a test "
                                    "split and the site and coordinator configs; classes are split by Dirichlet(alpha).")
    pr.add_argument("--source", choices=["digits", "fashion-mnist", "medmnist"], required=True)
    pr.add_argument("--npz", type=Path, help="MedMNIST-format .npz (train_images, train_labels, val_*, test_*)")
    pr.add_argument("--sites", type=int, required=True, help="number of hospital sites K")
    pr.add_argument("--alpha", type=float, required=True, help="Dirichlet concentration (small = more non-IID)")
    pr.add_argument("--format", choices=["dicom", "nifti", "mixed"], required=True, dest="fmt",
                    help="file format of the sites (mixed: DICOM and NIfTI hospitals alternately)")
    pr.add_argument("--out", type=Path, required=True, help="consortium folder to create")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--epsilon", type=float, default=1.0, help="per-site privacy budget written to the configs")
    pr.add_argument("--delta", type=float, default=1e-5)
    pr.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    pr.add_argument("--iterations", type=int, default=200)
    pr.add_argument("--method", choices=["dm", "gm"], default="dm")
    pr.add_argument("--no-dp", action="store_true", help="non-private configs (baselines and positive controls only)")
    pr.add_argument("--max-per-class", type=int, default=None, help="cap the training images taken per class")

    site = sub.add_parser("site", help="commands a hospital site operator runs").add_subparsers(
        dest="site_command", required=True, metavar="SITE_COMMAND")
    ck = site.add_parser("check", help="load and validate every scan; write quarantine.json",
                         formatter_class=fmt, epilog="example:\n  " + EXAMPLES["site check"],
                         description="Load every manifest row through MONAI, preprocess it, report per-class and "
                                     "per-status counts and write quarantine.json (every unused file and why). Exits "
                                     "non-zero only if the config is invalid or nothing usable remains.")
    ck.add_argument("config", type=Path, help="site config YAML")

    di = site.add_parser("distill", help="distill the site's training split into a small synthetic set under DP",
                         formatter_class=fmt, epilog="example:\n  " + EXAMPLES["site distill"],
                         description="Charge the site's privacy ledger for the planned steps (write-ahead), distill "
                                     "(DP distribution or gradient matching) and write synthetic.npz, synthetic.json "
                                     "and a preview grid under the config's output folder. An interrupted run "
                                     "resumes from its checkpoint without paying twice.")
    di.add_argument("config", type=Path, help="site config YAML")
    di.add_argument("--round", type=int, default=1, dest="round_", help="federated round (1 = one-shot)")
    di.add_argument("--global-model", type=Path, help="broadcast global model (safetensors) to match against")
    di.add_argument("--no-dp", action="store_true",
                    help="NON-PRIVATE run for baselines and positive controls (recorded as epsilon = inf)")

    bu = site.add_parser("budget", help="print the privacy budget spent and remaining, per round",
                         formatter_class=fmt, epilog="example:\n  " + EXAMPLES["site budget"],
                         description="Read the site's privacy_ledger.json and print every charge with the epsilon "
                                     "spent after it (recomputed by the accountant) and what remains.")
    bu.add_argument("config", type=Path, help="site config YAML")

    ev = site.add_parser("evaluate", help="score the consortium's global model on this site's own scans",
                         formatter_class=fmt, epilog="example:\n  " + EXAMPLES["site evaluate"],
                         description="Load the site's scans as `site check` does, refuse a model that is not the "
                                     "agreed architecture or holds NaN/Inf, and print accuracy, balanced accuracy, "
                                     "macro AUC and per-class recall on the audit holdout (patients never used) and "
                                     "on the training patients. Writes output/evaluation.json and evaluation.png "
                                     "(confusion matrices); computed from real records, they stay at the site.")
    ev.add_argument("config", type=Path, help="site config YAML")
    ev.add_argument("--model", type=Path, required=True,
                    help="global model (safetensors): the one the coordinator sent back after the last round "
                         "(output/global_model.safetensors) or any file of the agreed architecture")
    from medfdd.federation.flower import cli as flower_cli  # Flower deployment commands (no flwr import)

    flower_cli.add_site_parser(site)

    coord = sub.add_parser("coordinator", help="commands the consortium's coordinator runs").add_subparsers(
        dest="coordinator_command", required=True, metavar="COORDINATOR_COMMAND")
    cr = coord.add_parser("run", help="run every round in-process: all sites of the config on this machine",
                          formatter_class=fmt, epilog="example:\n  " + EXAMPLES["coordinator run"],
                          description="For each round: broadcast the global model, let every listed site distill "
                                      "(through the same code a Flower SuperNode runs), validate each offer (rejected "
                                      "ones are logged with their reason), merge, train and evaluate the global "
                                      "model. Writes run.json, global_model.safetensors, merged.npz and each site's "
                                      "artifacts and ledger under the config's output folder; a killed run resumes "
                                      "after its last finished round.")
    cr.add_argument("config", type=Path, help="coordinator config YAML")
    cr.add_argument("--no-dp", action="store_true",
                    help="NON-PRIVATE run of every site for baselines and positive controls (epsilon = inf)")
    flower_cli.add_coordinator_parsers(coord)
    flower_cli.add_federation_parser(sub)

    from privacy.audit.cli import add_audit_parser

    add_audit_parser(sub)

    de = sub.add_parser("demo", help="the whole story on bundled data (sklearn digits) in a few minutes",
                        formatter_class=fmt, epilog="example:\n  medfdd demo --out demo",
                        description="Materialise three hospitals as DICOM and NIfTI files (non-IID), check each, run "
                                    "one in-process coordinator round (each site distills under DP at epsilon 1, the "
                                    "offers are validated and merged, the global model is trained and evaluated), "
                                    "compare with centralized and local-only baselines, let each hospital score the "
                                    "global model on its own holdout, audit membership leakage and "
                                    "write the privacy officer's report. Ends with a summary table.")
    de.add_argument("--out", type=Path, default=Path("demo"), help="folder for the demo consortium (must be new)")
    de.add_argument("--iterations", type=int, default=10, help="paid DP steps per site")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        if args.command == "prepare":
            from medfdd.data.prepare import prepare_from_args

            prepare_from_args(args, console=Console())
        elif args.command == "site" and args.site_command == "check":
            from medfdd.data.check import check_site

            check_site(args.config, console=Console())
        elif args.command == "site" and args.site_command == "distill":
            from medfdd.distill.site import distill_site

            distill_site(args.config, round_=args.round_, global_model=args.global_model, no_dp=args.no_dp,
                         console=Console())
        elif args.command == "site" and args.site_command == "budget":
            from medfdd.distill.site import print_budget

            print_budget(args.config, console=Console())
        elif args.command == "site" and args.site_command == "evaluate":
            from medfdd.site_evaluation import evaluate_at_site

            evaluate_at_site(args.config, args.model, console=Console())
        elif args.command == "coordinator" and args.coordinator_command == "run":
            from medfdd.federation.inprocess import run_inprocess

            run_inprocess(args.config, console=Console(), no_dp=args.no_dp)
        elif args.command == "site" and args.site_command == "join":
            from medfdd.federation.flower.cli import run_site_join

            return run_site_join(args, console)
        elif args.command == "coordinator" and args.coordinator_command in ("superlink", "register", "flower-run"):
            from medfdd.federation.flower.cli import run_coordinator_command

            return run_coordinator_command(args, console)
        elif args.command == "federation":
            from medfdd.federation.flower.cli import run_federation_command

            return run_federation_command(args, console)
        elif args.command == "audit":
            from privacy.audit.cli import run_audit_command

            return run_audit_command(args, console=Console())
        elif args.command == "demo":
            from medfdd.demo import run_demo

            run_demo(args.out, iterations=args.iterations, console=Console())
        return 0
    except MedfddError as e:
        console.print(f"[bold red]error[/]: {e}", markup=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
