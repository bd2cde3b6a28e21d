"""Every command the coordinator guide (docs/coordinator.md) gives a new consortium is checked, in the guide's order:
the PKI commands run for real (their argv read from the guide); the service steps (useradd, install, cp, systemctl,
journalctl) run re-rooted into a temporary folder, after which the example units' ExecStart lines must find every
file where the guide put it (medfdd's own SuperLink/SuperNode argv builders check them) with private keys 0600; the
`medfdd` commands whose runs need a network, a SuperLink or a consortium are run by the named integration tests. A
command whose program this file does not know fails the test: a new step in the guide needs its check here."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from test_readme import _command_lines

import medfdd
from medfdd.cli import _parser
from medfdd.cli import main as medfdd_main
from medfdd.federation.flower.deploy import Security, superlink_argv, supernode_argv
from medfdd.federation.nvflare.job import main as nvflare_job_main

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "coordinator.md"
DEPLOY = ROOT / "docs" / "deploy"
COMMANDS = _command_lines(GUIDE)
SITE = "hospital-a"

# medfdd commands that need a consortium, a SuperLink or the network: the test that runs each one for real
RUN_BY = {
    ("coordinator", "agreement"): "tests/site/test_site_init.py",
    ("coordinator", "run"): "tests/integration/test_inprocess_run.py",
    ("coordinator", "superlink"): "tests/integration/test_flower_deployment.py",
    ("coordinator", "register"): "tests/integration/test_flower_deployment.py",
    ("coordinator", "flower-run"): "tests/integration/test_flower_deployment.py",
    ("site", "join"): "tests/integration/test_flower_deployment.py",
    ("federation", "certs"): __file__,
    ("federation", "keys"): __file__,
}
PIP_RUN_BY = {"wheel": "tests/integration/test_wheel_install.py"}


def _words(argv: list[str]) -> list[str]:
    return argv[1:] if argv[0] == "sudo" else argv


def _program(argv: list[str]) -> str:
    words = _words(argv)
    if Path(words[0]).name == "medfdd":
        return "medfdd"
    if words[0] == "python" and words[1] == "-m":
        return words[2]
    return words[0]


def _unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    unit.optionxform = str
    unit.read_string((DEPLOY / name).read_text())
    return unit


def _unit_file(service: str) -> str:
    """medfdd-supernode@hospital-a -> medfdd-supernode@.service (a template's instance), else NAME.service."""
    name = service.removesuffix(".service")
    return re.sub(r"@[^@]+$", "@", name) + ".service"


def _service_argv(name: str) -> list[str]:
    return shlex.split(_unit(name)["Service"]["ExecStart"].replace("%i", SITE))


def _env(name: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in shlex.split(_unit(name)["Service"]["Environment"].replace("%i", SITE)))


UNITS = sorted(p.name for p in DEPLOY.glob("*.service"))


def _with_local_imports(test: Path) -> str:
    """A test module's source and that of the helper modules beside it that it imports (e.g. flower_loopback)."""
    source = test.read_text()
    local = re.findall(r"^(?:from|import) (\w+)", source, re.M)
    return source + "".join((test.parent / f"{m}.py").read_text() for m in local if (test.parent / f"{m}.py").is_file())


def test_every_command_in_the_guide_has_a_check():
    known = {"medfdd", "pip", "sudo", "useradd", "install", "cp", "systemctl", "journalctl", "monai.bundle",
             "medfdd.federation.nvflare.job"}
    unknown = [shlex.join(a) for a in COMMANDS if _program(a) not in known]
    assert not unknown, f"commands in docs/coordinator.md with no check in {Path(__file__).name}: {unknown}"
    assert len(COMMANDS) >= 25  # the guide's walkthrough: install, in-process, Flower, systemd, NVFlare, bundle


def test_medfdd_commands_parse_and_the_ones_needing_a_consortium_are_run_by_integration_tests():
    for argv in (a for a in COMMANDS if _program(a) == "medfdd"):
        args = _parser().parse_args(_words(argv)[1:])
        words = tuple(_words(argv)[1:3])
        assert words in RUN_BY, f"no test runs `{shlex.join(argv)}`: add it to RUN_BY with the test that does"
        test = Path(RUN_BY[words])
        source = _with_local_imports(test if test.is_absolute() else ROOT / test)
        assert all(f'"{w}"' in source for w in words), f"{test} does not run `medfdd {' '.join(words)}`"
        assert not getattr(args, "insecure", False), "the guide's commands keep TLS and SuperNode authentication on"


def test_the_package_commands_name_this_version_and_its_extras():
    pyproject = (ROOT / "pyproject.toml").read_text()
    guide = GUIDE.read_text()
    for argv in (a for a in COMMANDS if _program(a) == "pip"):
        if argv[1] == "wheel":
            assert "--no-deps" in argv and (ROOT / PIP_RUN_BY["wheel"]).is_file()
            assert f"dist/medfdd-{medfdd.__version__}-py3-none-any.whl" in guide  # the file the comment promises
        else:
            assert argv[1] == "install"
            extras = re.findall(r"medfdd\[(\w+)\]", " ".join(argv[2:]))
            assert extras and all(re.search(rf"^{e} = \[", pyproject, re.M) for e in extras), argv


def test_the_nvflare_and_bundle_commands_parse_against_their_real_entry_points(tmp_path, capsys):
    jobs = [a for a in COMMANDS if _program(a) == "medfdd.federation.nvflare.job"]
    assert jobs
    for argv in jobs:
        with pytest.raises(SystemExit) as help_exit:  # the module's own parser accepts every option the guide uses
            nvflare_job_main([*argv[3:], "--help"])
        assert help_exit.value.code == 0
        usage = capsys.readouterr().out
        assert all(opt in usage for opt in argv[3:] if opt.startswith("--"))
    bundles = [a for a in COMMANDS if _program(a) == "monai.bundle"]
    assert bundles and all(a[3] == "run" for a in bundles)
    runner = (ROOT / "tests" / "coordinator" / "test_monai_models.py").read_text()  # runs monai.bundle's `run`
    for argv in bundles:
        assert all(f"{o[2:]}=" in runner for o in argv if o.startswith("--")), f"{argv}: an option no test passes"

def _reroot(path: str, root: Path) -> Path:
    return root / path.lstrip("/")


def test_the_deployment_walkthrough_leaves_every_file_where_the_units_read_it(tmp_path, monkeypatch):
    """PKI for real, then the service steps re-rooted into tmp_path/root, then the units' ExecStart checked."""
    work, root = tmp_path / "work", tmp_path / "root"
    work.mkdir()
    monkeypatch.chdir(work)
    users, dirs, installed, enabled, logs = [], [], {}, [], []
    (work / "site_configs").mkdir()
    (work / "site_configs" / f"{SITE}.yaml").write_text("# the hospital's site config (site operator guide)\n")
    for argv in COMMANDS:
        words, program = _words(argv), _program(argv)
        if program == "medfdd" and words[1] == "federation":
            assert medfdd_main(words[1:]) == 0, shlex.join(argv)
            if words[2] == "certs":  # "send certs/ca.crt to every site": the hospital keeps it as ./ca.crt
                shutil.copy(work / "certs" / "ca.crt", work / "ca.crt")
        elif program == "useradd":
            users.append((words[-1], words[words.index("--home-dir") + 1]))
        elif program == "install":
            opts = words[1:-1] if "-d" in words else words[1:-2]
            mode = int(opts[opts.index("-m") + 1], 8)
            target = _reroot(words[-1], root)
            if "-d" in words:
                target.mkdir(parents=True, exist_ok=True)
                dirs.append(words[-1])
            else:
                source = work / words[-2]
                assert source.is_file(), f"`{shlex.join(argv)}`: no earlier command in the guide makes {words[-2]}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                installed[words[-1]] = words[-2]
            os.chmod(target, mode)
        elif program == "cp":
            unit, dest = words[1], words[2]
            assert (DEPLOY / unit).is_file(), f"`{shlex.join(argv)}`: {unit} is not one of docs/deploy/'s units"
            _reroot(dest, root).mkdir(parents=True, exist_ok=True)
            shutil.copy(DEPLOY / unit, _reroot(dest, root) / unit)
        elif program == "systemctl":
            if words[1] != "daemon-reload":
                assert words[1:3] == ["enable", "--now"], argv
                enabled.append(words[3])
        elif program == "journalctl":
            logs.append(words[words.index("-u") + 1])

    system = root / "etc" / "systemd" / "system"
    for service in enabled + logs:  # every unit the guide enables or reads was copied there first
        assert (system / _unit_file(service)).is_file(), f"{service}: its unit was not copied to /etc/systemd/system"
    assert sorted({_unit_file(s) for s in enabled}) == UNITS  # both services are enabled

    for name in UNITS:
        service = _unit(name)["Service"]
        assert users == [(service["User"], _env(name)["HOME"])], "useradd must make the units' User with their HOME"
        assert service["WorkingDirectory"] in dirs and service["ReadWritePaths"] in dirs

    superlink = _parser().parse_args(_service_argv("medfdd-superlink.service")[1:])
    argv = superlink_argv(certs=_reroot(str(superlink.certs), root))  # raises if ca.crt / server.pem / .key are missing
    assert "--enable-supernode-auth" in argv
    node = _parser().parse_args(_service_argv("medfdd-supernode@.service")[1:])
    supernode_argv(site_config=_reroot(str(node.config), root), superlink=node.superlink,
                   security=Security(root_certificates=_reroot(str(node.root_certificates), root)),
                   private_key=_reroot(str(node.key), root))  # raises if the config, CA or key is not where installed

    private = {dest for dest, src in installed.items() if src.endswith((".key", f"keys/{SITE}"))}
    assert private == {"/etc/medfdd/certs/server.key", f"/etc/medfdd/keys/{SITE}"}
    for dest in installed:
        mode = stat.S_IMODE(_reroot(dest, root).stat().st_mode)
        assert mode == (0o600 if dest in private else 0o644) or dest.endswith(".yaml"), (dest, oct(mode))


@pytest.mark.skipif(shutil.which("useradd") is None, reason="useradd is not installed here")
def test_the_useradd_line_is_a_valid_useradd_command_line():
    argv = next(_words(a) for a in COMMANDS if _program(a) == "useradd")
    proc = subprocess.run(["useradd", "--help"], capture_output=True, text=True)
    assert all(opt in proc.stdout for opt in argv if opt.startswith("--"))
