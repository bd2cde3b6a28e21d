"""The Flower deployment commands of `medfdd` (parsers + handlers; `medfdd.cli` wires them in).

  medfdd federation certs    consortium CA + SuperLink server certificate (coordinator)
  medfdd federation keys     one hospital's SuperNode key pair (site)
  medfdd coordinator superlink    start the SuperLink (TLS + SuperNode authentication)
  medfdd coordinator register     register a hospital's public key
  medfdd coordinator flower-run   submit the run and wait until it completed (non-zero exit otherwise)
  medfdd site join           start this hospital's SuperNode with its site config

Nothing here imports `flwr`; the long-running commands replace this process with Flower's own (exec), so stopping
them stops Flower.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from rich.console import Console

EXAMPLES = {
    "federation certs": "medfdd federation certs --out certs --host coordinator.example.org --host 10.0.0.5",
    "federation keys": "medfdd federation keys --out keys --site hospital-a",
    "coordinator superlink": "medfdd coordinator superlink --certs certs --port 9093",
    "coordinator register": ("medfdd coordinator register keys/hospital-a.pub --site hospital-a --superlink "
                             "coordinator.example.org:9093 --root-certificates certs/ca.crt"),
    "coordinator flower-run": ("medfdd coordinator flower-run consortium/site_configs/coordinator.yaml --superlink "
                               "coordinator.example.org:9093 --root-certificates certs/ca.crt"),
    "site join": ("medfdd site join consortium/site_configs/hospital-a.yaml --superlink coordinator.example.org:9093 "
                  "--root-certificates ca.crt --key keys/hospital-a"),
}
FMT = argparse.RawDescriptionHelpFormatter


def _ex(name: str) -> str:
    return "example:\n  " + EXAMPLES[name]


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    p.add_argument("--root-certificates", type=Path, metavar="CA",
                   help="the consortium CA certificate (ca.crt) that signed the SuperLink's certificate")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS (closed test networks only; prints a warning)")


def add_federation_parser(sub) -> None:
    fed = sub.add_parser("federation", help="certificates and keys for a Flower deployment").add_subparsers(
        dest="federation_command", required=True, metavar="FEDERATION_COMMAND")
    ce = fed.add_parser("certs", help="make the consortium CA and the SuperLink's TLS certificate (coordinator)",
                        formatter_class=FMT, epilog=_ex("federation certs"),
                        description="Write ca.crt and ca.key (the consortium CA; ca.key stays with the coordinator) "
                                    "and server.pem / server.key (the SuperLink's certificate, ECDSA P-384, signed "
                                    "by the CA, valid for every --host). Give each site ca.crt.")
    ce.add_argument("--out", type=Path, required=True, help="folder to write the four files into")
    ce.add_argument("--host", action="append", dest="hosts", metavar="NAME_OR_IP",
                    help="DNS name or IP address the sites dial (repeatable; default 127.0.0.1 and localhost)")
    ce.add_argument("--days", type=int, default=365, help="validity in days")
    ce.add_argument("--force", action="store_true", help="replace existing files")
    ke = fed.add_parser("keys", help="make a hospital's SuperNode key pair (site)", formatter_class=FMT,
                        epilog=_ex("federation keys"),
                        description="Write OUT/SITE (ECDSA P-384 private key, OpenSSH format, mode 0600; it never "
                                    "leaves the site) and OUT/SITE.pub (send it to the coordinator, who registers "
                                    "it with `medfdd coordinator register`).")
    ke.add_argument("--out", type=Path, required=True, help="folder to write the key pair into")
    ke.add_argument("--site", required=True, help="the site_id of the site config")
    ke.add_argument("--force", action="store_true", help="replace existing files")


def add_coordinator_parsers(coord) -> None:
    sl = coord.add_parser("superlink", help="start the Flower SuperLink (TLS + SuperNode authentication)",
                          formatter_class=FMT, epilog=_ex("coordinator superlink"),
                          description="Start flower-superlink in the foreground with the certificates from `medfdd "
                                      "federation certs` and SuperNode authentication (only registered site keys "
                                      "may join). Keep it running; register the sites and start the run from "
                                      "another terminal.")
    sl.add_argument("--certs", type=Path, help="folder with ca.crt, server.pem, server.key")
    sl.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    sl.add_argument("--port", type=int, default=9093, help="port the sites and the flwr CLI dial (default 9093)")
    sl.add_argument("--database", type=Path, help="SQLite state file (default: in memory, lost on restart)")
    sl.add_argument("--insecure", action="store_true",
                    help="no TLS and no SuperNode authentication (closed test networks only; prints a warning)")
    rg = coord.add_parser("register", help="register a hospital's SuperNode public key with the SuperLink",
                          formatter_class=FMT, epilog=_ex("coordinator register"),
                          description="Register a site's public key (OUT/SITE.pub from `medfdd federation keys`); "
                                      "only registered keys can connect. Prints the node id.")
    rg.add_argument("public_key", type=Path, help="the site's .pub file")
    rg.add_argument("--site", help="the site id this key may offer for (default: the key's comment, which "
                                   "`medfdd federation keys` sets to the site id); offers for any other site id are "
                                   "rejected as spoofed")
    _connection_args(rg)
    fr = coord.add_parser("flower-run", help="run the federation over Flower and check that it completed",
                          formatter_class=FMT, epilog=_ex("coordinator flower-run"),
                          description="Submit the medfdd Flower app with this coordinator config (the path must "
                                      "exist on the SuperLink's machine), then poll the run until it finishes. "
                                      "Exits 0 only if the run finished:completed (`flwr run` alone exits 0 even "
                                      "when the run fails). The run directory is written under the config's "
                                      "`output`.")
    fr.add_argument("config", type=Path, help="coordinator config YAML")
    fr.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to wait for the run (default 24 h)")
    _connection_args(fr)


def add_site_parser(site) -> None:
    jo = site.add_parser("join", help="start this hospital's Flower SuperNode with its site config",
                         formatter_class=FMT, epilog=_ex("site join"),
                         description="Start flower-supernode in the foreground: it dials the coordinator's "
                                     "SuperLink over TLS (verified with the consortium's ca.crt), authenticates "
                                     "with this site's private key (registered by the coordinator) and answers "
                                     "each round with the site's DP synthetic set. Only the allow-listed offer "
                                     "(synthetic images, labels, declared metadata) leaves the site.")
    jo.add_argument("config", type=Path, help="site config YAML")
    jo.add_argument("--key", type=Path, help="this site's private key (from `medfdd federation keys`)")
    jo.add_argument("--port", type=int, default=9094,
                    help="local port of the SuperNode's own API (default 9094; one per SuperNode on a machine)")
    jo.add_argument("--reply-after", type=float, metavar="SECONDS",
                    help="hold every reply until SECONDS after the round's task arrived, so that its time reveals "
                         "only whether the site's turn took longer (keep it below the coordinator's site_timeout_s)")
    _connection_args(jo)


def _warn_insecure(console: Console) -> None:
    from medfdd.federation.flower.deploy import INSECURE_WARNING

    console.print(f"[bold red]{INSECURE_WARNING}[/]", markup=True, highlight=False)


def _security(args, console: Console):
    from medfdd.federation.flower.deploy import Security

    if args.insecure:
        _warn_insecure(console)
    return Security(root_certificates=None if args.insecure else args.root_certificates, insecure=args.insecure)


def _exec(argv: list[str], env: dict[str, str], console: Console) -> int:
    console.print("starting: " + " ".join(argv), highlight=False)
    os.execve(argv[0], argv, env)
    return 0  # not reached


def run_federation_command(args, console: Console) -> int:
    from medfdd.federation.flower.pki import make_site_keys, make_tls

    out = Console()
    if args.federation_command == "certs":
        files = make_tls(args.out, hosts=args.hosts or ["127.0.0.1", "localhost"], days=args.days, force=args.force)
        out.print(f"wrote {files.ca_cert} (give it to every site), {files.ca_key} (keep secret), "
                  f"{files.server_cert} and {files.server_key} (the SuperLink's)", highlight=False)
    elif args.federation_command == "keys":
        keys = make_site_keys(args.out, args.site, force=args.force)
        out.print(f"wrote {keys.private_key} (keep it at the site) and {keys.public_key} (send it to the "
                  "coordinator)", highlight=False)
    return 0


def run_coordinator_command(args, console: Console) -> int:
    from medfdd.federation.flower import deploy

    if args.coordinator_command == "superlink":
        if args.insecure:
            _warn_insecure(console)
        argv = deploy.superlink_argv(host=args.host, port=args.port, certs=args.certs, insecure=args.insecure,
                                     database=args.database)
        return _exec(argv, deploy.flower_env(), console)
    env = deploy.flower_env()
    security = _security(args, console)
    deploy.write_connection(args.superlink, security, env=env)
    if args.coordinator_command == "register":
        from medfdd.config import SITE_ID_PATTERN

        site = args.site or _key_comment(args.public_key)
        if not site or not re.match(SITE_ID_PATTERN, site):
            raise deploy.FlowerDeployError(str(args.public_key), f"no valid site id ({site!r}) for this key",
                                           "pass --site ID (the site_id of that hospital's site config)")
        node = deploy.register(args.public_key, env=env, name=site)
        Console().print(f"registered {args.public_key} for site {site} as SuperNode {node}", highlight=False)
        return 0
    if args.coordinator_command == "flower-run":
        from medfdd.config import load_coordinator_config
        from medfdd.rundir import RunDir

        cfg = load_coordinator_config(args.config)
        run_id = deploy.submit_run(args.config, env=env)
        console.print(f"submitted run {run_id}; waiting for it to finish (its log: `flwr log {run_id} "
                      f"{deploy.CONNECTION} --show`)", highlight=False)
        try:
            run = deploy.wait_run(run_id, env=env, timeout=args.timeout, console=console)
        except deploy.FlowerDeployError:
            _print_stopped(RunDir(cfg.output_dir).run_json, console)  # e.g. the quorum (min_sites) was not met
            raise
        Console().print(f"run {run_id} {run['status']} in {float(run.get('elapsed', 0)):.1f} s; results under "
                        f"{cfg.output_dir}", highlight=False)
        _print_final(RunDir(cfg.output_dir).run_json)
        return 0
    raise AssertionError(args.coordinator_command)


def _print_final(run_json: Path) -> None:
    """The final metrics, when the run directory is on this machine (the SuperLink's)."""
    import json

    try:
        final = json.loads(run_json.read_text(encoding="utf-8")).get("final") or {}
    except (OSError, ValueError):
        return
    if "accuracy" in final:
        Console().print(f"global model after round {final.get('round')}: accuracy {final['accuracy']:.3f}, balanced "
                        f"accuracy {final.get('balanced_accuracy', float('nan')):.3f}; {final.get('bytes_up_total', 0)} "
                        f"bytes up, {final.get('bytes_down_total', 0)} bytes down", highlight=False)


def _print_stopped(run_json: Path, console: Console) -> None:
    """Why the coordinator stopped the run (run.json `stopped`), when the run directory is on this machine."""
    import json

    try:
        stopped = json.loads(run_json.read_text(encoding="utf-8")).get("stopped")
    except (OSError, ValueError):
        return
    if stopped:
        missing = ", ".join(f"{s} ({why})" for s, why in stopped["missing"].items()) or "none"
        console.print(f"the coordinator stopped the run in round {stopped['round']}: {stopped['reason']}; accepted: "
                      f"{', '.join(stopped['accepted']) or 'none'}; missing: {missing}", highlight=False)


def _key_comment(path: Path) -> str | None:
    try:
        parts = Path(path).read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        return None
    return parts[2] if len(parts) > 2 else None


def run_site_join(args, console: Console) -> int:
    from medfdd.config import load_site_config
    from medfdd.federation.flower import deploy

    cfg = load_site_config(args.config)
    path = Path(args.config).resolve()
    if '"' in str(path) or "\\" in str(path):
        raise deploy.FlowerDeployError(str(path), "the path contains a quote or backslash",
                                       "move the site config to a path without them")
    security = _security(args, console)
    if args.reply_after is not None and not (math.isfinite(args.reply_after) and args.reply_after >= 0):
        raise deploy.FlowerDeployError("--reply-after", f"{args.reply_after} is not a number of seconds >= 0",
                                       "pass the seconds after which a round's reply may leave, e.g. 3000")
    argv = deploy.supernode_argv(site_config=path, superlink=args.superlink, security=security,
                                 private_key=args.key, port=args.port, reply_after_s=args.reply_after)
    console.print(f"site {cfg.site_id} joining {args.superlink}", highlight=False)
    return _exec(argv, deploy.flower_env(), console)
