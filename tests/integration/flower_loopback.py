"""A Flower deployment on loopback for the integration tests: a SuperLink and SuperNodes started with the documented
commands, each in its own process group under a fresh FLWR_HOME, stopped by PID (`Deployment.stop_all`)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml

from medfdd.cli import main
from medfdd.config import load_coordinator_config
from medfdd.federation.consortium import consortium_of
from medfdd.federation.flower import deploy

HOST = "127.0.0.1"


def tail(path: Path, n: int = 40) -> str:
    try:
        return f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"--- {path.name}: no log"


def flower_coordinator_config(coord: Path, name: str, **overrides) -> Path:
    """The Flower shape of a coordinator config: the agreed consortium spec instead of the sites' config paths."""
    cfg = load_coordinator_config(coord)
    spec, _ = consortium_of(cfg)
    data = yaml.safe_load(coord.read_text())
    data.pop("sites")
    data["consortium"] = spec.model_dump(mode="json")
    data.update(output=f"../runs/{name}", **overrides)
    path = coord.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Deployment:
    def __init__(self, base: Path):
        self.base = base
        self.logs = base / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = deploy.flower_env(flwr_home=base / "flwr-home", threads=1)
        self.port = deploy.free_port(HOST)
        self.address = f"{HOST}:{self.port}"

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.procs[name] = deploy.start(argv, env=self.env, log=self.logs / f"{name}.log")
        return self.procs[name]

    def join(self, name: str, site_config: Path, key: Path) -> subprocess.Popen:
        return self.start(name, [sys.executable, "-m", "medfdd.cli", "site", "join", str(site_config),
                                 "--superlink", self.address, "--root-certificates", str(self.ca),
                                 "--key", str(key), "--port", str(deploy.free_port(HOST))])

    def cli(self, *args: str) -> int:
        return main([*args, "--superlink", self.address, "--root-certificates", str(self.ca)])

    def online(self) -> int:
        return sum(n["status"] == "online" for n in deploy.list_supernodes(env=self.env))

    def wait_online(self, n: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while self.online() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {n} SuperNodes online after {timeout} s\n{self.log_tails()}")
            time.sleep(0.5)

    def log_tails(self) -> str:
        return "\n".join(tail(p) for p in sorted(self.logs.glob("*.log")))

    def stop_all(self) -> None:
        for proc in self.procs.values():
            deploy.stop(proc)
