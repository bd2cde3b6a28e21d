"""The `medfdd` command line: prepare, site {init,check,distill,budget,evaluate}, coordinator {run,agreement}, config
schema, audit, demo.

Habits: `--version`; `-q/-v`; `--json` (the result alone on stdout, messages on stderr) where a script wants the
result; exit codes from `medfdd.exit_codes` (docs/troubleshooting.md); Ctrl-C exits 130 with a resume hint; messages
are not hard-wrapped when the output is not a terminal; each run that has an output folder leaves what it printed
in `<output>/logs/<command>-<UTC time>.log`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.control import Control

from medfdd import __version__, exit_codes
from medfdd.config import (
    DEFAULT_PAID_STEPS,
    DEFAULT_ROUNDS,
    HYBRID_MIN_ALPHA,
    HYBRID_MIN_EPSILON,
    HYBRID_MIN_SITE_RECORDS,
    MODES,
)
from medfdd.errors import MedfddError

EXAMPLES = {
    "prepare": "medfdd prepare --source digits --sites 3 --alpha 0.5 --format dicom --out consortium --seed 0",
    "site check": "medfdd site check consortium/site_configs/hospital-a.yaml",
    "site distill": "medfdd site distill consortium/site_configs/hospital-a.yaml --round 1",
    "site budget": "medfdd site budget consortium/site_configs/hospital-a.yaml",
    "site evaluate": "medfdd site evaluate consortium/site_configs/hospital-a.yaml "
                     "--model consortium/runs/hospital-a/global_model.safetensors",
    "coordinator run": "medfdd coordinator run consortium/site_configs/coordinator.yaml",
    "coordinator agreement": "medfdd coordinator agreement site_configs/coordinator.yaml --out agreement.yaml",
    "site init": "medfdd site init --agreement agreement.yaml --site-id hospital-a --data /srv/export "
                 "--out site_configs/hospital-a.yaml",
    "config schema": "medfdd config schema site --out site_configs/medfdd-site.schema.json",
}


RESUME = {"site distill": "rerun the same command: it resumes from its last checkpoint without paying twice",
          "coordinator run": "rerun the same command: it resumes after its last finished round"}
WIDE = 200  # columns when the output is not a terminal (a file, a pipe, CI): lines are not hard-wrapped


def _verbosity(p: argparse.ArgumentParser, default) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="print only errors (and the --json result); the run's log file still gets everything")
    g.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="more detail: errors come with their traceback")


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON on stdout (and nothing else there; messages go to stderr)")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="medfdd", formatter_class=fmt,
        description="Federated dataset distillation for hospitals under differential privacy.",
        epilog="example:\n  " + "\n  ".join(EXAMPLES.values()) + "\n\nexit codes: 0 done, 1 privacy violation "
               "found by `medfdd audit`, 2 usage error, 3 error, 130 interrupted (docs/troubleshooting.md)")
    p.add_argument("--version", action="version", version=f"medfdd {__version__}")
    _verbosity(p, default=False)
    common = argparse.ArgumentParser(add_help=False)  # -q/-v also after the command (kept if given before it)
    _verbosity(common, default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pr = sub.add_parser("prepare", help="materialise a non-IID consortium of site folders from a labelled source",
                        formatter_class=fmt, parents=[common], epilog="example:\n  " + EXAMPLES["prepare"],
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
    pr.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="federated rounds the budget is planned over")
    pr.add_argument("--iterations", type=int, default=DEFAULT_PAID_STEPS,
                    help="paid DP steps per site over all rounds (split evenly between them)")
    pr.add_argument("--method", choices=["dm", "gm"], default="dm")
    pr.add_argument("--mode", choices=MODES, default="auto",
                    help=f"one-shot (merged synthetic sets) or hybrid (then DP fine-tuning rounds); auto: hybrid at "
                         f"epsilon >= {HYBRID_MIN_EPSILON:g} per site on mildly non-IID (alpha >= {HYBRID_MIN_ALPHA:g}) "
                         f"sites of >= {HYBRID_MIN_SITE_RECORDS:,} training records, where it was measured ahead, "
                         "else one-shot (docs/benchmarks.md#hybrid-mode)")
    pr.add_argument("--no-dp", action="store_true", help="non-private configs (baselines and positive controls only)")
    pr.add_argument("--max-per-class", type=int, default=None, help="cap the training images taken per class")
    pr.set_defaults(handler=_prepare, output_of=lambda args: args.out, fresh_output=True)

    site = sub.add_parser("site", help="commands a hospital site operator runs").add_subparsers(
        dest="site_command", required=True, metavar="SITE_COMMAND")
    it = site.add_parser("init", help="write this site's config and labels.csv from the consortium agreement and a "
                         "folder-per-class export", formatter_class=fmt, parents=[common],
                         epilog="example:\n  " + EXAMPLES["site init"],
                         description="Walk DATA/<class>/... (one folder per agreed class), write DATA/labels.csv "
                                     "(path,label,patient_id; the patient id from the DICOM PatientID, else the folder "
                                     "below the class folder) and a site config holding the agreed classes, sizes, "
                                     "intensity, rounds and this site's budget, every other key at its default, plus "
                                     "the config's JSON Schema beside it. Refuses before writing anything: a folder "
                                     "that is no agreed class, an agreed class without scans, a file that is no scan, "
                                     "a site id not in the agreement, an existing config or labels.csv.")
    it.add_argument("--agreement", type=Path, required=True, help="the agreement file the coordinator published")
    it.add_argument("--site-id", required=True, help="this site's id in the agreement")
    it.add_argument("--data", type=Path, required=True, help="the export: one sub-folder per class, named as the class")
    it.add_argument("--out", type=Path, required=True, help="site config to write (e.g. site_configs/SITE.yaml)")
    it.add_argument("--output", type=Path, default=None,
                    help="the site's artifact folder (ledger, noise key, synthetic sets; default runs/SITE_ID here)")
    it.add_argument("--format", choices=["auto", "dicom", "nifti", "png"], default="auto", dest="fmt",
                    help="scan format (auto: by suffix or DICOM magic, per file); written as data.format")
    it.add_argument("--patient-id", choices=["auto", "folder", "none"], default="auto",
                    help="auto: DICOM PatientID, else the folder below the class folder; folder: that folder only; "
                         "none: no patient ids")
    it.add_argument("--skip-unknown", action="store_true", help="skip (and list) files that are no scan instead of "
                    "refusing the export")
    it.add_argument("--allow-missing-classes", action="store_true",
                    help="accept agreed classes this site has no scans of (listed)")
    it.add_argument("--force", action="store_true", help="replace an existing config and labels.csv")
    _json_flag(it)
    it.set_defaults(handler=_site_init)

    ck = site.add_parser("check", help="load and validate every scan; write quarantine.json",
                         formatter_class=fmt, parents=[common], epilog="example:\n  " + EXAMPLES["site check"],
                         description="Load every manifest row through MONAI, preprocess it, report per-class and "
                                     "per-status counts and write quarantine.json (every unused file and why). Exits "
                                     "non-zero only if the config is invalid or nothing usable remains.")
    ck.add_argument("config", type=Path, help="site config YAML")
    _json_flag(ck)
    ck.set_defaults(handler=_site_check, output_of=_site_output)

    di = site.add_parser("distill", help="distill the site's training split into a small synthetic set under DP",
                         formatter_class=fmt, parents=[common], epilog="example:\n  " + EXAMPLES["site distill"],
                         description="Charge the site's privacy ledger for the planned steps (write-ahead), distill "
                                     "(DP distribution or gradient matching) and write synthetic.npz, synthetic.json "
                                     "and a preview grid under the config's output folder. An interrupted run "
                                     "resumes from its checkpoint without paying twice.")
    di.add_argument("config", type=Path, help="site config YAML")
    di.add_argument("--round", type=int, default=1, dest="round_", metavar="ROUND",
                    help="federated round (1 = one-shot)")
    di.add_argument("--global-model", type=Path, help="broadcast global model (safetensors) to match against")
    di.add_argument("--no-dp", action="store_true",
                    help="NON-PRIVATE run for baselines and positive controls (recorded as epsilon = inf)")
    di.set_defaults(handler=_site_distill, output_of=_site_output)

    bu = site.add_parser("budget", help="print the privacy budget spent and remaining, per round",
                         formatter_class=fmt, parents=[common], epilog="example:\n  " + EXAMPLES["site budget"],
                         description="Read the site's privacy_ledger.json and print every charge with the epsilon "
                                     "spent after it (recomputed by the accountant) and what remains.")
    bu.add_argument("config", type=Path, help="site config YAML")
    _json_flag(bu)
    bu.set_defaults(handler=_site_budget, output_of=_site_output)

    ev = site.add_parser("evaluate", help="score the consortium's global model on this site's own scans",
                         formatter_class=fmt, parents=[common], epilog="example:\n  " + EXAMPLES["site evaluate"],
                         description="Load the site's scans as `site check` does, refuse a model that is not the "
                                     "agreed architecture or holds NaN/Inf, and print accuracy, balanced accuracy, "
                                     "macro AUC and per-class recall on the audit holdout (patients never used) and "
                                     "on the training patients. Writes output/evaluation.json and evaluation.png "
                                     "(confusion matrices); computed from real records, they stay at the site.")
    ev.add_argument("config", type=Path, help="site config YAML")
    ev.add_argument("--model", type=Path, required=True,
                    help="global model (safetensors): the one the coordinator sent back after the last round "
                         "(output/global_model.safetensors) or any file of the agreed architecture")
    _json_flag(ev)
    ev.set_defaults(handler=_site_evaluate, output_of=_site_output)
    from medfdd.federation.flower import cli as flower_cli  # Flower deployment commands (no flwr import)

    flower_cli.add_site_parser(site)
    site.choices["join"].set_defaults(handler=_flower_site_join)

    coord = sub.add_parser("coordinator", help="commands the consortium's coordinator runs").add_subparsers(
        dest="coordinator_command", required=True, metavar="COORDINATOR_COMMAND")
    cr = coord.add_parser("run", help="run every round in-process: all sites of the config on this machine",
                          formatter_class=fmt, parents=[common], epilog="example:\n  " + EXAMPLES["coordinator run"],
                          description="For each round: broadcast the global model, let every listed site distill "
                                      "(through the same code a Flower SuperNode runs), validate each offer (rejected "
                                      "ones are logged with their reason), merge, train and evaluate the global "
                                      "model. Writes run.json, global_model.safetensors, merged.npz and each site's "
                                      "artifacts and ledger under the config's output folder; a killed run resumes "
                                      "after its last finished round.")
    cr.add_argument("config", type=Path, help="coordinator config YAML")
    cr.add_argument("--no-dp", action="store_true",
                    help="NON-PRIVATE run of every site for baselines and positive controls (epsilon = inf)")
    _json_flag(cr)
    cr.set_defaults(handler=_coordinator_run, output_of=_coordinator_output)
    ag = coord.add_parser("agreement", help="publish what every site must agree to (for `medfdd site init`)",
                          formatter_class=fmt, parents=[common], epilog="example:\n  " + EXAMPLES["coordinator agreement"],
                          description="Write the consortium agreement derived from the coordinator config: classes in "
                                      "order, spatial size, channels, the intensity scaling of the test split, "
                                      "orientation and spacing, ipc, rounds and every site's budget (the `consortium` "
                                      "block, or the listed site configs). Send it to every site.")
    ag.add_argument("config", type=Path, help="coordinator config YAML")
    ag.add_argument("--out", type=Path, required=True, help="agreement file to write (replaced atomically)")
    ag.set_defaults(handler=_coordinator_agreement)
    flower_cli.add_coordinator_parsers(coord)
    for name in ("superlink", "register", "flower-run"):
        coord.choices[name].set_defaults(handler=_flower_coordinator)
    flower_cli.add_federation_parser(sub)
    sub.choices["federation"].set_defaults(handler=_flower_federation)

    conf = sub.add_parser("config", help="config tools: JSON Schemas for editors").add_subparsers(
        dest="config_command", required=True, metavar="CONFIG_COMMAND")
    sc = conf.add_parser("schema", help="print or write the JSON Schema of a config file",
                         formatter_class=fmt, parents=[common], epilog="example:\n  " + EXAMPLES["config schema"],
                         description="The JSON Schema (draft 2020-12) of a site config, coordinator config or "
                                     "consortium agreement, from the same models that validate them. Editors with "
                                     "yaml-language-server validate and complete a config whose first line is "
                                     "`# yaml-language-server: $schema=PATH`.")
    sc.add_argument("kind", choices=["site", "coordinator", "agreement"])
    sc.add_argument("--out", type=Path, help="file to write (default: stdout)")
    sc.set_defaults(handler=_config_schema)

    from privacy.cli import add_audit_parser

    add_audit_parser(sub)
    sub.choices["audit"].set_defaults(handler=_audit, output_of=lambda args: args.out)

    de = sub.add_parser("demo", help="the whole story on Fashion-MNIST (sklearn digits when it is not installed) in "
                        "under 10 minutes",
                        formatter_class=fmt, parents=[common], epilog="example:\n  medfdd demo --out demo",
                        description="Materialise three hospitals as DICOM and NIfTI files (non-IID), check each, run "
                                    "one in-process coordinator round (each site distills under DP at epsilon 1, the "
                                    "offers are validated and merged, the global model is trained and evaluated), "
                                    "let each hospital score it on its own holdout next to the global model fine-tuned "
                                    "there and a local-only model, compare with centralized, local-only and DP-FedAvg "
                                    "(same epsilon) baselines, audit membership leakage and write the privacy "
                                    "officer's report. Ends with a summary table. Runs on Fashion-MNIST (Debian's "
                                    "dataset-fashion-mnist) when it is installed, else on sklearn digits.")
    de.add_argument("--out", type=Path, default=Path("demo"), help="folder for the demo consortium (must be new)")
    de.add_argument("--source", choices=["auto", "fashion-mnist", "digits"], default="auto",
                    help="auto: Fashion-MNIST when installed, else digits")
    de.add_argument("--iterations", type=int, default=None, help="paid DP steps per site (default: the demo "
                    "setting's for the data)")
    de.set_defaults(handler=_demo, output_of=lambda args: args.out, fresh_output=True)
    return p


# ------------------------------------------------------------------ handlers: (args, out, err) -> exit code or None


def _emit(args, result) -> None:
    """With --json, the result is the only thing on stdout (infinite epsilons as the strings "inf")."""
    if getattr(args, "json", False):
        from medfdd.io import json_safe

        sys.stdout.write(json.dumps(json_safe(result), indent=2, allow_nan=False, default=str) + "\n")
        sys.stdout.flush()


def _prepare(args, out: Console, err: Console) -> None:
    from medfdd.prepare.consortium import prepare_from_args

    prepare_from_args(args, console=out)


def _site_config(args):
    """The site config of a `site` command, parsed once per command."""
    if getattr(args, "site_config", None) is None:
        from medfdd.config import load_site_config

        args.site_config = load_site_config(args.config)
    return args.site_config


def _site_init(args, out: Console, err: Console) -> None:
    from medfdd.config import load_agreement
    from medfdd.site.init import init_site

    result = init_site(load_agreement(args.agreement), agreement_path=args.agreement, site_id=args.site_id,
                       data=args.data, out=args.out, output=args.output, fmt=args.fmt, patient_id=args.patient_id,
                       skip_unknown=args.skip_unknown, allow_missing_classes=args.allow_missing_classes,
                       force=args.force, console=out)
    _emit(args, dataclasses.asdict(result))


def _coordinator_agreement(args, out: Console, err: Console) -> None:
    from medfdd.federation.consortium import agreement_of, agreement_text
    from medfdd.io import atomic_write_text

    agreement = agreement_of(_coordinator_config(args))
    atomic_write_text(args.out, agreement_text(agreement, args.config.name))
    out.print(f"wrote {args.out}: {len(agreement.classes)} classes, {len(agreement.sites)} sites "
              f"({', '.join(agreement.sites)}), {agreement.rounds} round(s); send it to every site "
              "(`medfdd site init --agreement ...`)", highlight=False)


def _config_schema(args, out: Console, err: Console) -> None:
    from medfdd.config import schema_text

    text = schema_text(args.kind)
    if args.out is None:
        sys.stdout.write(text)
        return
    from medfdd.io import atomic_write_text

    atomic_write_text(args.out, text)
    out.print(f"wrote {args.out}", highlight=False)


def _site_check(args, out: Console, err: Console) -> None:
    from medfdd.site.check import check_site

    _emit(args, dataclasses.asdict(check_site(_site_config(args), console=out)))


def _site_distill(args, out: Console, err: Console) -> None:
    from medfdd.site.distill import distill_site

    distill_site(_site_config(args), round_=args.round_, global_model=args.global_model, no_dp=args.no_dp, console=out)


def _site_budget(args, out: Console, err: Console) -> None:
    from medfdd.site.budget import print_budget

    _emit(args, print_budget(_site_config(args), console=out))


def _site_evaluate(args, out: Console, err: Console) -> None:
    from medfdd.site.evaluate import evaluate_at_site

    _emit(args, evaluate_at_site(_site_config(args), args.model, console=out))


def _coordinator_run(args, out: Console, err: Console) -> None:
    from medfdd.federation.inprocess import run_inprocess
    from medfdd.rundir import RunDir

    run_dir = run_inprocess(_coordinator_config(args), console=out, no_dp=args.no_dp)
    _emit(args, json.loads(RunDir(run_dir).run_json.read_text(encoding="utf-8")))


def _flower_site_join(args, out: Console, err: Console) -> int:
    from medfdd.federation.flower.cli import run_site_join

    return run_site_join(args, err)


def _flower_coordinator(args, out: Console, err: Console) -> int:
    from medfdd.federation.flower.cli import run_coordinator_command

    return run_coordinator_command(args, err)


def _flower_federation(args, out: Console, err: Console) -> int:
    from medfdd.federation.flower.cli import run_federation_command

    return run_federation_command(args, err)


def _audit(args, out: Console, err: Console) -> int:
    from privacy.cli import run_audit_command

    return run_audit_command(args, console=out)


def _demo(args, out: Console, err: Console) -> None:
    from medfdd.demo import keep_freed_memory, run_demo

    keep_freed_memory()
    run_demo(args.out, source=None if args.source == "auto" else args.source,
             overrides={} if args.iterations is None else {"iterations": args.iterations}, console=out)


def _site_output(args) -> Path:
    return _site_config(args).output_dir


def _coordinator_config(args):
    """The coordinator config of `coordinator run`, parsed once per command."""
    if getattr(args, "coordinator_config", None) is None:
        from medfdd.config import load_coordinator_config

        args.coordinator_config = load_coordinator_config(args.config)
    return args.coordinator_config


def _coordinator_output(args) -> Path:
    return _coordinator_config(args).output_dir


# ------------------------------------------------------------------ consoles, log file, exit codes


class _TeeConsole(Console):
    """A console that also copies what it prints to the run's log console (not the live progress redraws)."""

    def __init__(self, log: Console, **kwargs):
        super().__init__(**kwargs)
        self._log = log

    def print(self, *objects, **kwargs) -> None:
        super().print(*objects, **kwargs)
        if not objects or not all(isinstance(o, Control) for o in objects):
            self._log.print(*objects, **kwargs)


def _console(file, *, quiet: bool, log: Console) -> Console:
    tty = file.isatty()
    return _TeeConsole(log, file=file, quiet=quiet, soft_wrap=not tty, width=None if tty else WIDE)


def _output_folder(args) -> Path | None:
    try:
        return Path(args.output_of(args)) if hasattr(args, "output_of") else None
    except (MedfddError, OSError):
        return None  # the command reports the problem itself


def _write_log(log: Console, folder: Path, name: str, started: datetime, err: Console) -> None:
    from medfdd.io import atomic_write_text

    path = folder / "logs" / f"{name}-{started:%Y%m%dT%H%M%S}.{started.microsecond:06d}Z.log"
    try:
        atomic_write_text(path, log.file.getvalue(), durable=False)
    except (MedfddError, OSError) as e:
        err.print(f"[yellow]warning[/]: no log file written ({e})", highlight=False)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # a usage error exits with exit_codes.USAGE (argparse's 2)
    command = " ".join(x for x in (args.command, getattr(args, "site_command", None),
                                   getattr(args, "coordinator_command", None), getattr(args, "config_command", None))
                       if x)
    log = Console(file=io.StringIO(), width=WIDE, soft_wrap=True, color_system=None, force_terminal=False,
                  force_jupyter=False, force_interactive=False)
    as_json = getattr(args, "json", False)
    out = _console(sys.stderr if as_json else sys.stdout, quiet=args.quiet, log=log)
    err = _console(sys.stderr, quiet=False, log=log)
    started = datetime.now(UTC)
    folder = _output_folder(args)
    existed = folder is not None and folder.is_dir()
    code = exit_codes.RUNTIME_ERROR
    try:
        code = args.handler(args, out, err) or exit_codes.OK
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/]: {RESUME.get(command, 'nothing was finished; rerun the same command')}",
                  highlight=False)
        code = exit_codes.INTERRUPTED
    except MedfddError as e:
        if args.verbose:
            err.print_exception()
        err.print(f"[bold red]error[/]: {e}", highlight=False)
    except Exception:  # a bug: show where
        err.print_exception()
        err.print("[bold red]internal error[/]: this is a bug; please report it with the traceback above")
    finally:
        # a command that needs a new output folder (prepare, demo) must not leave a log in one it failed to fill
        if folder is not None and folder.is_dir() and (existed or code == exit_codes.OK
                                                       or not getattr(args, "fresh_output", False)):
            _write_log(log, folder, command.replace(" ", "-"), started, err)
    return code


if __name__ == "__main__":
    sys.exit(main())
