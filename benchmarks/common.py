"""What every benchmark result records: commit, machine, versions, wall time, peak memory."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import torch

from medfdd.config import PrivacyConfig
from medfdd.site.record_count import noisy_count
from privacy.accounting import calibrate_round_noise

RESULTS = Path(__file__).parent / "results"
COUNT_NOISE = PrivacyConfig.model_fields["count_noise"].default  # the site default: the sample rate reads a DP count


def honest_plan(*, n: int, batch: int, epsilon: float, delta: float, steps_per_round: int, rounds: int, seed: int,
                count_noise: float | None = COUNT_NOISE) -> tuple[float, float, list[tuple[float, float, int]]]:
    """(sigma, sample rate, record-count charge) as a site with default privacy settings plans them: q = batch / n~
    with n~ the DP record count (its Gaussian charge composed before calibrating), or batch / n when `count_noise` is
    None (n declared public). epsilon inf: no noise, no count."""
    if not math.isfinite(epsilon):
        return 0.0, min(1.0, batch / n), []
    prior = [(count_noise, 1.0, 1)] if count_noise else []
    q = min(1.0, batch / (noisy_count(n, count_noise, seed) if count_noise else n))
    sigma = calibrate_round_noise(epsilon=epsilon, delta=delta, sample_rate=q, steps_per_round=steps_per_round,
                                  rounds=rounds, already_spent=prior)
    return sigma, q, prior


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
