"""What every benchmark result records: commit, machine, versions, wall time, peak memory."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "torch": torch.__version__, "python": platform.python_version()}


def git_commit() -> str:
    """HEAD's short hash; MEDFDD_COMMIT overrides it where the tree travels without .git (the GPU machine)."""
    if os.environ.get("MEDFDD_COMMIT"):
        return os.environ["MEDFDD_COMMIT"]
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              check=True).stdout.strip()

    try:  # "+dirty": tracked files differed from HEAD when the benchmark started
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


COMMIT_AT_START = git_commit()  # the code that ran, even if commits land while a benchmark runs


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(name: str, payload: dict, out_dir: Path = RESULTS) -> Path:
    """<out_dir>/<name>.json (default benchmarks/results/) with the common provenance fields."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.json"
    record = {"benchmark": name, "commit": COMMIT_AT_START, "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out
