"""`medfdd demo` as a user runs it, over several noise draws: what its summary shows, and its wall and CPU time.

Each draw is the whole demo (`medfdd.demo.run_demo`: prepare, check, the coordinator's round with each site's
evaluation and fine-tuning, baselines, audit and report) in a fresh folder, so every site creates a new secret noise
key: the split (seed 0) is the same, the DP noise is new. Each draw runs in its own process (`--one`), so its CPU time
(user + sys of that process and its children, `resource.getrusage`) is the demo's alone; on a busy machine the wall
time is not (the note says how busy it was: the 1-minute load average around each draw).

Run: `nice -n 10 .venv/bin/python benchmarks/demo_draws.py --out /tmp/demo_draws --draws 3 [--source digits]`
(`OMP_NUM_THREADS=1` makes the CPU time the work itself: torch's idle threads spin on a busy machine)
writes benchmarks/results/demo_<source>.json and the note demo_<source>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_result  # noqa: E402

ROWS = (("medfdd (merged DP synthetic sets)", "accuracy"), ("DP-FedAvg (same epsilon)", "dp_fedavg_accuracy"),
        ("local-only (mean over sites)", "local_only_accuracy"), ("centralized (NOT private)", "centralized_accuracy"))


def one(out: Path, source: str | None) -> dict:
    from rich.console import Console

    from medfdd.demo import keep_freed_memory, run_demo

    keep_freed_memory()  # as `medfdd demo` does
    load = os.getloadavg()[0]
    s = run_demo(out, source=source, console=Console(quiet=True))
    ru = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    s["cpu_seconds"] = sum(r.ru_utime + r.ru_stime for r in ru)
    s["load_average_1min"] = [load, os.getloadavg()[0]]
    s["threads"] = __import__("torch").get_num_threads()
    return s


def _ms(v: list[float]) -> str:
    return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def note(result: dict) -> str:
    draws = result["draws"]
    src = draws[0]["data"]["source"]
    lines = [f"# `medfdd demo` on {src}: {len(draws)} noise draws",
             "",
             f"Produced by `benchmarks/demo_draws.py` (demo_{src}.json, commit {result['commit']}, {result['date']}, "
             f"{result['machine']['cpu']}, {result['machine']['cores']} cores, torch {result['machine']['torch']}). "
             "Each draw is the whole demo in a fresh folder (same split, new site noise keys); accuracy on the "
             "coordinator's test split, mean ± sd over draws.",
             "",
             "| model | accuracy | per draw |", "|---|---|---|"]
    for label, key in ROWS:
        v = [d[key] for d in draws]
        lines.append(f"| {label} | {_ms(v)} | {', '.join(f'{x:.3f}' for x in v)} |")
    margin = [d["accuracy"] - d["local_only_accuracy"] for d in draws]
    lines += ["", f"medfdd minus local-only: {_ms(margin)} (smallest {min(margin):.3f}).", "",
              "Each hospital on its own audit holdout (mean ± sd over draws; local-only does not depend on the draw):",
              "", "| site | scans used | global | fine-tuned here | local-only |", "|---|---|---|---|---|"]
    for sid in draws[0]["sites"]:
        per = [d["sites"][sid] for d in draws]
        lines.append(f"| {sid} | {per[0]['used']} | {_ms([p['holdout_accuracy'] for p in per])} | "
                     f"{_ms([p['fine_tuned_holdout_accuracy'] for p in per])} | "
                     f"{_ms([p['local_only_holdout_accuracy'] for p in per])} |")
    lines += ["", "| draw | wall s | CPU s (user + sys) | torch threads | load average (1 min) before, after | "
              "stages (wall s / CPU s) |", "|---|---|---|---|---|---|"]
    for i, d in enumerate(draws):
        cpu = d.get("stage_cpu_seconds", {})
        stages = ", ".join(f"{k} {v:.0f} / {cpu.get(k, float('nan')):.0f}" for k, v in d["stage_seconds"].items())
        lines.append(f"| {i} | {d['seconds']:.0f} | {d['cpu_seconds']:.0f} | {d['threads']} | "
                     f"{d['load_average_1min'][0]:.1f}, {d['load_average_1min'][1]:.1f} | {stages} |")
    fed = draws[0]["dp_fedavg_settings"]
    lines += ["", f"DP-FedAvg: {json.dumps(fed)}; medfdd's one round moves each site's synthetic set once "
              f"({draws[0]['sites'][next(iter(draws[0]['sites']))]['bytes_up']:,} bytes from hospital-a), "
              f"DP-FedAvg {draws[0]['dp_fedavg_bytes_up_per_site']:,} bytes up per site.", ""]
    if result.get("reading"):
        lines += [result["reading"], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="a new folder for the draws' demo folders")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1, help="draws run at once (their wall times then overlap: compare "
                    "CPU times)")
    ap.add_argument("--source", choices=["fashion-mnist", "digits"], default=None, help="default: the demo's choice")
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: run one draw, write its summary here
    ap.add_argument("--reading", default=None, help="a closing paragraph for the note")
    args = ap.parse_args()
    if args.one is not None:
        summary = one(args.one.parent / "demo", args.source)
        args.one.write_text(json.dumps(summary, indent=2, default=str))
        return
    draws, running = [], []
    for i in range(args.draws):
        folder = args.out / f"draw{i}"
        folder.mkdir(parents=True)
        cmd = [sys.executable, __file__, "--out", str(args.out), "--one", str(folder / "summary.json")]
        running.append(subprocess.Popen(cmd + (["--source", args.source] if args.source else [])))
        if len(running) == args.jobs or i == args.draws - 1:
            if any(p.wait() for p in running):
                sys.exit("a draw failed")
            running = []
    for i in range(args.draws):
        draws.append(json.loads((args.out / f"draw{i}" / "summary.json").read_text()))
        print(f"draw {i}: medfdd {draws[-1]['accuracy']:.3f}, local-only {draws[-1]['local_only_accuracy']:.3f}, "
              f"DP-FedAvg {draws[-1]['dp_fedavg_accuracy']:.3f}, wall {draws[-1]['seconds']:.0f} s, "
              f"CPU {draws[-1]['cpu_seconds']:.0f} s", flush=True)
    src = draws[0]["data"]["source"]
    path = write_result(f"demo_{src.replace('-', '_')}", {"draws": draws, "reading": args.reading}, RESULTS)
    result = json.loads(path.read_text())
    path.with_suffix(".md").write_text(note(result))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
