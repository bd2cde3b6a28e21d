"""The medfdd NVFlare job: the server runs `CoordinatorController` with the coordinator config, and one client per
site listed in it (client name = site_id) runs `SiteExecutor` with that site's config; run in NVFlare's simulator
or exported for a real NVFlare deployment.

  python -m medfdd.federation.nvflare.job --config coordinator.yaml --workspace DIR          (simulator)
  python -m medfdd.federation.nvflare.job --config coordinator.yaml --export JOB_DIR [--site SITE_ID=PATH ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.job_config.api import FedJob

from medfdd.config import CoordinatorConfig, load_coordinator_config
from medfdd.errors import MedfddError
from medfdd.federation.consortium import consortium_of
from medfdd.federation.nvflare.controller import CoordinatorController, NVFlareJobError, check_supported
from medfdd.federation.nvflare.executor import DISTILL_TASK, FINAL_TASK, SiteExecutor
from medfdd.io import atomic_write_json

JOB_NAME = "medfdd"
# NVFlare builds only the component classes a site's `local/resources.json` allows (`class_allow_list`): every party
# of a real deployment adds these two to its own list; the simulator's workspace gets them here
COMPONENTS = (f"{CoordinatorController.__module__}.{CoordinatorController.__name__}",
              f"{SiteExecutor.__module__}.{SiteExecutor.__name__}")


def build_job(config_path: Path, site_configs: dict[str, str] | None = None) -> FedJob:
    """The job for the coordinator config at `config_path`: one client per site, named by its site_id, with the path
    of its site config (`site_configs`, as on each hospital's machine; default: the config's listed `sites`)."""
    config_path = Path(config_path).resolve()
    cfg = load_coordinator_config(config_path)
    check_supported(cfg, config_path)
    spec, sites = consortium_of(cfg)
    if site_configs is None:
        site_configs = {sc.site_id: str(p.resolve()) for p, sc in zip(cfg.site_paths, sites.values(), strict=True)}
    unknown = sorted(set(site_configs) - set(spec.sites))
    if not site_configs or unknown:
        raise NVFlareJobError(f"{config_path}", f"sites {unknown} are not in the consortium" if unknown else
                              "names no site (neither `sites` nor --site)",
                              "list the site configs in `sites`, or give --site SITE_ID=PATH for each consortium site")
    job = FedJob(name=JOB_NAME, min_clients=len(site_configs))
    job.set_app_packages(["medfdd", "privacy"])  # installed at every party: nothing copied into the job's custom/
    job.to_server(CoordinatorController(coordinator_config=str(config_path)))
    for site_id, path in sorted(site_configs.items()):
        job.to(SiteExecutor(site_config=str(path)), site_id, tasks=[DISTILL_TASK, FINAL_TASK])
    return job


def _site_arg(text: str) -> tuple[str, str]:
    site, sep, path = text.partition("=")
    if not sep or not site or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not SITE_ID=PATH")
    return site, path


def run_simulator(config_path: Path, workspace: Path, *, threads: int = 1) -> Path:
    """Run the job in NVFlare's simulator (server and clients on this machine, over loopback); returns the run
    directory, or raises NVFlareJobError when the run did not complete."""
    cfg: CoordinatorConfig = load_coordinator_config(Path(config_path).resolve())
    job = build_job(config_path)
    atomic_write_json(Path(workspace) / "local" / "resources.json",
                      {"class_allow_list": [*DEFAULT_CLASS_ALLOW_LIST, *COMPONENTS]})
    rc = job.simulator_run(str(Path(workspace).resolve()), threads=threads)
    run_json = cfg.output_dir / "run.json"
    status = json.loads(run_json.read_text()).get("status") if run_json.is_file() else None
    if rc != 0 or status != "completed":
        raise NVFlareJobError(str(run_json), f"the NVFlare simulator exited {rc} with run status {status!r}",
                              f"see the simulator's log under {workspace}")
    return cfg.output_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medfdd.federation.nvflare.job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="coordinator config YAML (the simulator runs its listed site configs)")
    p.add_argument("--workspace", type=Path, help="simulator workspace folder (logs, NVFlare state)")
    p.add_argument("--export", type=Path, metavar="JOB_DIR", help="write the job folder here instead of running it")
    p.add_argument("--site", type=_site_arg, action="append", dest="sites", metavar="SITE_ID=PATH",
                   help="with --export: a client and its site config path on that hospital's machine (repeatable; "
                        "default: the config's listed sites)")
    p.add_argument("--threads", type=int, default=1, help="simulator client threads (default 1: sites take turns)")
    args = p.parse_args(argv)
    try:
        if args.export:
            build_job(args.config, dict(args.sites) if args.sites else None).export_job(str(args.export))
            print(f"job written to {args.export / JOB_NAME}")
        elif args.workspace:
            print(f"run directory: {run_simulator(args.config, args.workspace, threads=args.threads)}")
        else:
            p.error("give --workspace (run in the simulator) or --export (write the job)")
    except MedfddError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
