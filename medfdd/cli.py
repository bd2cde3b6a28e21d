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
    pr.add_argument("--format", choices=["dicom", "nifti"], required=True, dest="fmt")
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
        return 0
    except MedfddError as e:
        console.print(f"[bold red]error[/]: {e}", markup=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
