"""Start and drive a Flower 1.42 deployment (SuperLink, SuperNodes, runs) through Flower's own commands.

Nothing here imports `flwr`: the SuperLink, the SuperNodes and the `flwr` CLI are separate processes started from
this environment's bin folder. The builders (`superlink_argv`, `supernode_argv`) are shared by the `medfdd`
commands (which exec them in the foreground) and the integration tests (which start them in the background and stop
them by PID).

Secure by default: TLS (server certificate signed by the consortium CA) and SuperNode authentication (each site's
ECDSA key registered with the SuperLink). `insecure=True` turns both off and prints a loud warning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from medfdd.errors import MedfddError
from medfdd.io import atomic_write_text

APP_DIR = Path(__file__).resolve().parent / "app"
CONNECTION = "medfdd"  # the SuperLink connection medfdd writes into $FLWR_HOME/config.toml
DEFAULT_PORT = 9093
DONE_OK = "finished:completed"
INSECURE_WARNING = ("WARNING: INSECURE MODE (--insecure). Traffic between the hospitals and the coordinator is NOT "
                    "encrypted and ANY machine that can reach the SuperLink can join as a site. Use only on a "
                    "closed test network, never with patient-derived data.")


class FlowerDeployError(MedfddError):
    """A Flower process or command failed, or a run did not complete."""


@dataclass(frozen=True)
class Security:
    """How a process talks to the SuperLink: TLS root certificate (sites, CLI) or insecure."""

    root_certificates: Path | None = None
    insecure: bool = False

    def __post_init__(self):
        if not self.insecure and self.root_certificates is None:
            raise FlowerDeployError("--root-certificates", "no CA certificate given",
                                    "pass the consortium's ca.crt (from `medfdd federation certs`), or --insecure on "
                                    "a closed test network")
        if self.root_certificates is not None and not Path(self.root_certificates).is_file():
            raise FlowerDeployError(str(self.root_certificates), "CA certificate not found",
                                    "pass the ca.crt written by `medfdd federation certs`")


def bin_dir() -> Path:
    """The folder of this environment's executables (flower-superlink, flower-supernode, flwr, ...)."""
    return Path(sys.executable).parent


def tool(name: str) -> str:
    path = bin_dir() / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FlowerDeployError(name, "Flower command not found", "install medfdd with its dependencies "
                                "(`pip install medfdd-*.whl` or `make install`); flwr provides it")
    return found


def flower_env(base: dict[str, str] | None = None, *, flwr_home: Path | None = None,
               threads: int | None = None) -> dict[str, str]:
    """Environment for Flower processes: this environment's bin first on PATH (the SuperLink and SuperNodes start
    `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by name), runtime dependency installation off (no
    index is contacted), optional FLWR_HOME and thread caps."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = str(bin_dir()) + os.pathsep + env.get("PATH", "")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    if threads is not None:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(threads)
    return env


def flwr_home(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env["FLWR_HOME"]) if env.get("FLWR_HOME") else Path.home() / ".flwr"


def parse_address(address: str, *, flag: str = "--superlink") -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", address.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise FlowerDeployError(flag, f"{address!r} is not HOST:PORT", "pass e.g. coordinator.example.org:9093")
    return m.group(1), int(m.group(2))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host` (chosen by the OS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, *, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until `host:port` accepts TCP connections; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FlowerDeployError(f"{host}:{port}", f"the process exited with code {proc.returncode} before "
                                    "listening", "read its log")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise FlowerDeployError(f"{host}:{port}", f"nothing listening after {timeout:.0f} s", "read the SuperLink log")


# ---------------------------------------------------------------------------------------------------- processes


def superlink_argv(*, host: str = "0.0.0.0", port: int = DEFAULT_PORT, certs: Path | None = None,
                   insecure: bool = False, database: Path | None = None, log_file: Path | None = None) -> list[str]:
    """flower-superlink with TLS (ca.crt, server.pem, server.key from `certs`) and SuperNode authentication."""
    argv = [tool("flower-superlink"), "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation", "--isolation", "subprocess"]
    if insecure:
        argv.append("--insecure")
    else:
        if certs is None:
            raise FlowerDeployError("--certs", "no certificate folder given",
                                    "make one with `medfdd federation certs --out certs` and pass --certs certs")
        certs = Path(certs).resolve()
        files = {"--ssl-ca-certfile": certs / "ca.crt", "--ssl-certfile": certs / "server.pem",
                 "--ssl-keyfile": certs / "server.key"}
        for f in files.values():
            if not f.is_file():
                raise FlowerDeployError(str(f), "missing", "make the certificates with `medfdd federation certs`")
        for k, v in files.items():
            argv += [k, str(v)]
        argv.append("--enable-supernode-auth")
    if database is not None:
        argv += ["--database", str(Path(database).resolve())]
    if log_file is not None:
        argv += ["--log-file", str(Path(log_file).resolve())]
    return argv


def supernode_argv(*, site_config: Path, superlink: str, security: Security, private_key: Path | None,
                   port: int = 9094, max_wait_time: float | None = None, reply_after_s: float | None = None
                   ) -> list[str]:
    """flower-supernode for one hospital: dials the SuperLink over TLS, authenticates with the site's private key and
    passes the site config path to the ClientApp as node config `site-config` (and `reply-after-s`: the ClientApp
    holds each reply until that many seconds after its task arrived)."""
    parse_address(superlink)
    site_config = Path(site_config).resolve()
    if not site_config.is_file():
        raise FlowerDeployError(str(site_config), "site config not found", "pass the site's YAML config")
    argv = [tool("flower-supernode"), "--superlink", superlink, "--port", str(port),
            "--node-config", f'site-config="{site_config}"' + (
                f" reply-after-s={float(reply_after_s)!r}" if reply_after_s is not None else "")]
    if security.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(Path(security.root_certificates).resolve())]
        if private_key is None:
            raise FlowerDeployError("--key", "no SuperNode private key given", "make one with `medfdd federation "
                                    "keys --site ID` and have the coordinator register the .pub file")
        if not Path(private_key).is_file():
            raise FlowerDeployError(str(private_key), "private key not found",
                                    "pass the key written by `medfdd federation keys`")
        argv += ["--auth-supernode-private-key", str(Path(private_key).resolve())]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return argv


def start(argv: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a long-running Flower process in its own process group (so it and the apps it spawns can be stopped
    together by its PID), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop(proc: subprocess.Popen, *, timeout: float = 10.0) -> int | None:
    """Stop a process started by `start` and its process group: SIGTERM, then SIGKILL after `timeout`."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # whatever it spawned in its group (ClientApps, ServerApps) goes too
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    return proc.returncode


# ------------------------------------------------------------------------------------------------- flwr commands


def write_connection(address: str, security: Security, *, env: dict[str, str] | None = None,
                     name: str = CONNECTION) -> Path:
    """Add (or replace) the SuperLink connection `name` in $FLWR_HOME/config.toml; other connections are kept."""
    import tomli_w

    parse_address(address)
    path = flwr_home(env) / "config.toml"
    cfg: dict = {}
    if path.is_file():
        try:
            cfg = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise FlowerDeployError(str(path), f"not valid TOML ({e})", "fix or remove the file") from None
    links = cfg.setdefault("superlink", {})
    conn: dict = {"address": address}
    if security.insecure:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(security.root_certificates).resolve())
    links[name] = conn
    links.setdefault("default", name)
    return atomic_write_text(path, tomli_w.dumps(cfg))


def flwr(args: list[str], *, env: dict[str, str], timeout: float = 120.0) -> dict:
    """Run `flwr ARGS --format json` and return its JSON answer; a failure is a FlowerDeployError."""
    argv = [tool("flwr"), *args, "--format", "json"]
    try:
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise FlowerDeployError(f"flwr {' '.join(args[:2])}", f"no answer within {timeout:.0f} s",
                                "check that the SuperLink is running and reachable") from None
    data = _last_json(res.stdout)
    if res.returncode != 0 or data is None or not data.get("success", False):
        detail = (data or {}).get("error-message") or (res.stderr.strip() or res.stdout.strip())[-800:]
        raise FlowerDeployError(f"flwr {' '.join(args[:2])}", f"failed (exit {res.returncode}): {detail}",
                                "check the SuperLink address, its CA certificate and that it is running")
    return data


def _last_json(text: str) -> dict | None:
    for start in [m.start() for m in re.finditer(r"^\{", text, flags=re.M)][::-1]:
        try:
            obj = json.loads(text[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def register(public_key: Path, *, env: dict[str, str], name: str | None = None,
             connection: str = CONNECTION) -> int:
    """Register a site's public key with the SuperLink; returns the SuperNode's node id."""
    from medfdd.federation.flower.pki import check_public_key

    check_public_key(public_key)
    args = ["supernode", "register", str(Path(public_key).resolve()), connection]
    if name:
        args += ["--name", name]
    return int(flwr(args, env=env)["node-id"])


def list_supernodes(*, env: dict[str, str], connection: str = CONNECTION) -> list[dict]:
    return list(flwr(["supernode", "list", connection], env=env).get("nodes", []))


def submit_run(coordinator_config: Path, *, env: dict[str, str], connection: str = CONNECTION,
               app_dir: Path = APP_DIR) -> int:
    """`flwr run` the medfdd app with this coordinator config (an absolute path on the SuperLink's machine)."""
    cfg = Path(coordinator_config).resolve()
    override = f'coordinator-config="{cfg}"'
    return int(flwr(["run", str(app_dir), connection, "--run-config", override], env=env)["run-id"])


def run_status(run_id: int, *, env: dict[str, str], connection: str = CONNECTION) -> dict:
    runs = flwr(["list", connection, "--run-id", str(run_id)], env=env).get("runs", [])
    if not runs:
        raise FlowerDeployError(f"run {run_id}", "unknown to the SuperLink", "check the run id")
    return runs[0]


def wait_run(run_id: int, *, env: dict[str, str], timeout: float, poll: float = 4.0,
             connection: str = CONNECTION, console: Console | None = None) -> dict:
    """Poll `flwr list` until the run is finished; fail unless it finished:completed (`flwr run` exits 0 even when
    the run fails)."""
    console = console or Console(quiet=True)
    deadline = time.monotonic() + timeout
    last = None
    while True:
        run = run_status(run_id, env=env, connection=connection)
        status = run.get("status", "")
        if status != last:
            console.print(f"run {run_id}: {status}")
            last = status
        if status.startswith("finished"):
            if status != DONE_OK:
                raise FlowerDeployError(f"run {run_id}", f"ended {status}: {run.get('status-details', '')}",
                                        f"the ServerApp's log: `flwr log {run_id} {connection} --show`")
            return run
        if time.monotonic() > deadline:
            raise FlowerDeployError(f"run {run_id}", f"still {status} after {timeout:.0f} s",
                                    f"wait longer (--timeout) or stop it with `flwr stop {run_id} {connection}`")
        time.sleep(poll)
