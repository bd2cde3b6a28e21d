"""Regenerate benchmarks/results/README.md from the JSON results (run after any benchmark)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from medfdd.config import (
    DEFAULT_ROUNDS,
    HYBRID_DISTILL_EPSILON,
    HYBRID_FINETUNE_ROUNDS,
    HYBRID_GLOBAL_WIDTH,
    HYBRID_MIN_ALPHA,
    HYBRID_MIN_EPSILON,
    HYBRID_MIN_SITE_RECORDS,
    CoordinatorConfig,
    DistillConfig,
    FinetuneConfig,
    TrainConfig,
    recommended_mode,
)

sys.path.insert(0, str(Path(__file__).parent))
from common import COUNT_NOISE, RESULTS  # noqa: E402
from plots import best_fedavg, eps_value, fedavg_label, write_figures  # noqa: E402

ANCHORS = """| method | private? | IPC 1 | IPC 10 | IPC 50 |
|---|---|---|---|---|
| DC (ICLR'21) | no | 70.5 | 82.3 | 83.6 |
| DSA (ICML'21) | no | 70.6 | 84.6 | 88.7 |
| DM (WACV'23) | no | 70.7* | 83.5* | 88.1* |
| DP-MERF | yes, eps 1** | – | 65.5 | 71.3 |
| PSG (NeurIPS'22) | yes | – | 68.5 | – |
| NDPDC (DP distribution matching) | yes | – | 77.7 | 78.8 |
| Dosser (ICCV'25) | yes | – | 80.1 | 83.1 |
| full training set | no | 93.5* | | |

\\* commonly tabulated values; \\*\\* inferred epsilon (see shared/BENCHMARKS.md)."""


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _prov(r: dict) -> str:
    m = r["machine"]
    note = f" ({r['commit_note']})" if r.get("commit_note") else ""
    return (f"commit `{r['commit']}`{note}, {m['cpu']} ({m['cores']} cores){', ' + m['gpu'] if m.get('gpu') else ''}, "
            f"torch {m['torch']}, {r['date']}")


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f} %"


def b1_section(r: dict) -> list[str]:
    rows = r["rows"]
    gpu = any(row.get("gpu_peak_memory_mb") is not None for row in rows)
    evals = len(rows[0]["accuracies"]) if rows else 0
    per_row = "per row" in (r.get("iterations"), r.get("eval_epochs"))
    sizing = (f"{r['iterations']} DP steps, real batch {r['batch_per_class']}/class (Poisson), evaluation "
              f"{r['eval_epochs']} epochs x {evals} trainings" if not per_row else
              f"DP steps and evaluation epochs per row, real batch {r['batch_per_class']}/class (Poisson), "
              f"{evals} evaluation trainings")
    lines = [f"### B1 central, Fashion-MNIST ({r['scale']}-scale): `{r['benchmark']}`", "",
             f"{_prov(r)}; {sizing}" + (f", peak memory {r['peak_memory_mb']:.0f} MB (process RSS)"
                                        if r.get("peak_memory_mb") else "")
             + (f", GPU {r['gpu_peak_memory_mb']:.0f} MB (max_memory_allocated)" if r.get("gpu_peak_memory_mb")
                else "") + ".", ""]
    if r.get("note"):
        lines += [r["note"], ""]
    if r.get("parallel_workers"):
        lines += [f"The configurations ran as {r['parallel_workers']} processes at once on the one GPU (each sized "
                  "to finish by a deadline), so their s / iteration and TFLOP/s are contended; the alone table below "
                  "is the card's speed for one process. TFLOP/s counts convolution/matmul FLOPs of one DP step "
                  "(real embedding in bf16, synthetic forward + backward in fp32/TF32) over the measured time, "
                  "against the card's dense bf16 peak.", ""]
    head = "| method | IPC | epsilon (accounted) | sigma | accuracy % (mean ± sd) | s / iteration |"
    rule = "|---|---|---|---|---|---|"
    if per_row:
        head, rule = head + " steps | eval epochs |", rule + "---|---|"
    if gpu:
        head, rule = head + " TFLOP/s (of peak) | GPU MB |", rule + "---|---|"
    lines += [head, rule]
    for row in rows:
        eps = row["epsilon"] if row["epsilon"] == "inf" else f"{row['epsilon']:g} ({row['epsilon_accounted']:.3f})"
        how = f"{row.get('schedule', 'interleaved')}, {row.get('inner_steps', 1)} upd/stat"
        line = (f"| DP-{row['method'].upper()} ({how}) | {row['ipc']} | {eps} | {row['noise_multiplier']:.3f} | "
                f"{100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_sd']:.1f} | "
                f"{row['seconds_per_iteration']:.3f} |")
        if per_row:
            line += f" {row['iterations']} | {row['eval_epochs']} |"
        if gpu:
            line += (f" {row['tflops_achieved']:.1f} ({_pct(row.get('fraction_of_peak'))}) | "
                     f"{row['gpu_peak_memory_mb']:.0f} |")
        lines.append(line)
    for note in r.get("notes", []):
        lines += ["", note]
    profile = r.get("isolated_profile")
    if profile:
        lines += ["", "One process alone on the GPU (20 timed DP steps after 3 warm-up, "
                  f"real batch {profile[0]['batch_per_class']}/class):", "",
                  "| IPC | s / iteration | GFLOP / iteration | TFLOP/s | of bf16 dense peak | GPU MB |",
                  "|---|---|---|---|---|---|"]
        for p in profile:
            lines.append(f"| {p['ipc']} | {p['seconds_per_iteration']:.4f} | {p['flops_per_iteration'] / 1e9:.0f} | "
                         f"{p['tflops_achieved']:.1f} | {_pct(p.get('fraction_of_peak'))} of "
                         f"{p['peak_bf16_dense_tflops']} | {p['gpu_peak_memory_mb']:.0f} |")
    if r.get("aggregate_distill_tflops"):
        lines += ["", f"All finished rows together: {r['aggregate_distill_tflops']:.1f} TFLOP/s of DP-step FLOPs "
                  f"over the {r['parallel_phase_seconds']:.0f} s parallel phase (evaluation included)."]
    return lines + [""]


def federated_section(results: list[dict]) -> list[str]:
    """B1 federated and B2 communication: our rows and the baselines on the same split, bytes vs FedAvg."""
    lines = ["### B1 federated / B2 communication (Fashion-MNIST, Dirichlet non-IID sites)", ""]
    for r in results:
        p = r["partition"]
        lines += [f"**{r['benchmark']}** — {p['sites']} sites, alpha {p['alpha']}, seed {p['seed']}, records per site "
                  f"{p['site_totals']}; {r['iterations']} DP steps per round, real batch {r['batch_per_class']}/class, "
                  f"evaluation {r['eval_epochs']} epochs on the 10k test split; {_prov(r)}", ""]
        if r.get("unfinished"):
            lines += [f"Unfinished: {r['unfinished']}", ""]
        if r.get("note"):
            lines += [r["note"], ""]
        lines += ["| method | eps per site | rounds | accuracy % | bytes up (all sites) | seconds |",
                  "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            acc = f"{100 * row['accuracy_mean']:.1f}" + (f" ± {100 * row['accuracy_sd']:.1f}"
                                                         if row.get("accuracy_sd") else "")
            up = f"{row['bytes_up_total']:,}" if "bytes_up_total" in row else "–"
            lines.append(f"| {fedavg_label(row)} | {row.get('epsilon', 'inf')} | {row.get('rounds', '–')} | {acc} | {up} "
                         f"| {row.get('seconds', 0):.0f} |")
        ours = [row for row in r["rows"] if row["method"].startswith("dp-dm")]
        if ours:
            size = ours[0].get("model_bytes") or 1_234_984  # ConvNet-3 width 128 on 28x28, float32
            per_round = 2 * size * p["sites"]
            o = ours[0]
            moved = o["bytes_up_total"] + o.get("bytes_down_total", 0)
            lines += ["", f"B2: one round of FedAvg moves {per_round:,} bytes (model up and down, all sites); the "
                          f"{o['rounds']}-round medfdd run moves {moved:,} bytes in all "
                          f"(one FedAvg round / this whole run = {per_round / moved:.1f}).", ""]
        lines.append("")
    return lines


def equal_accuracy_bytes(ours: dict, dpfedavg: dict, sites: int) -> tuple[float, int, int]:
    """(level, our bytes, DP-FedAvg bytes) to first reach the lower of the two final accuracies, from each run's
    per-round accuracy and bytes (ours: the synthetic sets up every round, the global model down from round 2)."""
    level = min(ours["accuracy_per_round"][-1], dpfedavg["accuracy_per_round"][-1])
    r_ours = next(i for i, a in enumerate(ours["accuracy_per_round"], 1) if a >= level)
    r_fed = next(i for i, a in enumerate(dpfedavg["accuracy_per_round"], 1) if a >= level)
    down_per_round = ours.get("bytes_down_total", 0) // max(ours["rounds"] - 1, 1)  # global models, from round 2
    ours_bytes = ours["bytes_up_total"] // ours["rounds"] * r_ours + down_per_round * (r_ours - 1)
    return level, ours_bytes, 2 * dpfedavg["model_bytes"] * sites * r_fed


def merge_study_section(r: dict) -> list[str]:
    """b1_merge_study.py: the same saved site offers merged under each coordinator strategy."""
    lines = [f"### Coordinator merge of the same site offers: {r['benchmark']}", "", _prov(r), "",
             f"Offers `{r['offers']}` ({', '.join(r['sites'])}); global model {r['eval_epochs']} epochs. "
             f"{r.get('note', '')}", "", "| merge | accuracy % (mean ± sd) | evaluations |", "|---|---|---|"]
    for row in r["rows"]:
        label = row.get("label") or row["merge"] + (f" ^{row['evidence_power']:g}" if "evidence_power" in row else "")
        lines.append(f"| {label} | {100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_sd']:.1f} | "
                     f"{len(row['accuracies'])} |")
    return lines + [""]


def _setting(row: dict) -> tuple:
    """What makes two FedAvg runs the same setting: method, epsilon, rounds and settings (not the training seed)."""
    return (row["method"], eps_value(row.get("epsilon")), row.get("rounds"),
            json.dumps(row.get("fedavg_settings"), sort_keys=True))


def same_setting_runs(row: dict, rows: list[dict]) -> list[float]:
    """Accuracies of every FedAvg run of `row`'s setting (other training seeds)."""
    return [r["accuracy_mean"] for r in rows if _setting(r) == _setting(row)]


def federated_headline(results: list[dict]) -> list[str]:
    """One table per Dirichlet split: every run on it (ours and the baselines), and bytes at equal accuracy."""
    splits: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in results:
        p = r["partition"]
        splits.setdefault((p["sites"], p["alpha"], p["seed"], tuple(p["site_totals"])), []).extend(
            (r, row) for row in r["rows"])
    lines = ["### Headline: B1 federated, every run on each split", "",
             "Bytes moved = synthetic sets (or model updates) up plus global models down, all sites; for every "
             "method it leaves out the final model sent back to the sites after the last round (the same size for "
             "all: run.json's `final_model_bytes_down`). The last column "
             "compares communication at equal accuracy: the bytes DP-FedAvg at the same epsilon moved until its "
             "accuracy first reached the lower of the two final accuracies, over the bytes our run moved until it did "
             "(where DP-FedAvg never reached our accuracy this compares at its final one, which understates the gap).",
             ""]
    for (sites, alpha, seed, totals), runs in sorted(splits.items(), key=lambda kv: (-sum(kv[0][3]), kv[0][1])):
        lines += [f"**{sites} sites, alpha {alpha:g}, seed {seed}, {sum(totals):,} training records** (per site "
                  f"{list(totals)})", "",
                  "| method | eps per site | rounds | accuracy % | bytes moved | DP-FedAvg bytes / ours at equal "
                  "accuracy | file |", "|---|---|---|---|---|---|---|"]
        best = best_fedavg([row for _, row in runs])
        baselines = {eps: row for (method, eps), (row, _) in best.items() if method.startswith("DP-FedAvg")}
        shown = [(r, row) for r, row in runs  # of the FedAvg settings tried, the best one per epsilon
                 if not row["method"].startswith(("DP-FedAvg", "FedAvg")) or any(row is b for b, _ in best.values())]
        ours_first = sorted(shown, key=lambda rr: (not rr[1]["method"].startswith("dp-dm"),
                                                   -eps_value(rr[1].get("epsilon")), rr[1].get("rounds") or 0))
        for r, row in ours_first:
            acc = f"{100 * row['accuracy_mean']:.1f}" + (f" ± {100 * row['accuracy_sd']:.1f}"
                                                         if row.get("accuracy_sd") else "")
            moved = f"{row['bytes_up_total'] + row.get('bytes_down_total', 0):,}" if "bytes_up_total" in row else "–"
            ratio, fed, source = "–", baselines.get(eps_value(row.get("epsilon"))), r["benchmark"]
            if row["method"].startswith("dp-dm"):
                source += (f" ({r['scale']} scale, {r['iterations']} paid steps per round, batch "
                           f"{r['batch_per_class']}/class"
                           + (f", distillation seed {row['dm_seed']}" if row.get("dm_seed", seed) != seed else "") + ")")
                if fed is not None:
                    level, mine, theirs = equal_accuracy_bytes(row, fed, sites)
                    ratio = f"x{theirs / mine:.1f} (at {100 * level:.1f} %)"
            eps, method = eps_value(row.get("epsilon")), fedavg_label(row)
            repeats = same_setting_runs(row, [rw for _, rw in runs]) if row["method"].startswith(
                ("DP-FedAvg", "FedAvg")) else []
            tried = best.get((row["method"], eps), (None, 1))[1] - max(len(repeats) - 1, 0)
            if tried > 1:
                method += f" (best of {tried} settings tried)"
            if len(repeats) > 1:  # the best setting rerun with other training seeds: its spread, not its luckiest run
                acc += (f"; that setting over {len(repeats)} training seeds: {100 * np.mean(repeats):.1f} ± "
                        f"{100 * np.std(repeats, ddof=1):.1f}")
            lines.append(f"| {method} | {'∞' if math.isinf(eps) else f'{eps:g}'} | {row.get('rounds', '–')} | "
                         f"{acc} | {moved} | {ratio} | {source} |")
        lines.append("")
    return lines


CELL_ALPHAS, CELL_EPS, CELL_DRAWS = (0.1, 0.5), (1.0, 4.0, 10.0), 3


def _ours_key(r: dict, row: dict) -> tuple:
    """What makes two of our runs the same configuration (not the noise draw)."""
    rounds = (f"{row['rounds']} round(s)" if "rounds" in row else
              f"{row['distill']['rounds']} distillation + {row['finetune_rounds']} DP-FedAvg round(s)")
    return (row["method"], rounds, r.get("scale"), r.get("iterations"), r.get("batch_per_class"),
            r.get("inner_steps"), row.get("count_noise"), json.dumps(row.get("fedavg_settings"), sort_keys=True),
            row.get("finetune_rounds"), row.get("share_finetune"))


def _honest(key: tuple) -> bool:
    """Whether a configuration (`_ours_key`) ran under the honest-privacy defaults: a DP record count sets the sample
    rate (count_noise recorded), or hybrid mode (which exists only since)."""
    return key[0].startswith("hybrid") or key[6] is not None


def _mode(row: dict) -> str:
    return "hybrid" if row["method"].startswith("hybrid") else "one-shot"


def _is_default(r: dict, row: dict) -> bool:
    """Whether one of our runs is its mode's default configuration: what `medfdd prepare` writes (config defaults;
    hybrid: the plan of medfdd.config's HYBRID_* constants), only the data, the split and the budget set."""
    if _mode(row) == "hybrid":
        f = FinetuneConfig()
        return (row.get("finetune_rounds") == HYBRID_FINETUNE_ROUNDS and row["distill"].get("rounds") == DEFAULT_ROUNDS
                and row.get("epsilon_distill_target") == HYBRID_DISTILL_EPSILON
                and row.get("fedavg_settings") == {"lr": f.lr, "batch_size": f.batch_size, "clip": f.clip_norm,
                                                   "width": HYBRID_GLOBAL_WIDTH})
    d, c = DistillConfig(), CoordinatorConfig.model_fields
    return (r.get("scale") == "cpu" and r.get("iterations") == d.iterations
            and r.get("batch_per_class") == d.batch_per_class and r.get("inner_steps") == d.updates_per_statistic
            and r.get("eval_epochs") == TrainConfig().epochs and row.get("ipc_per_site") == d.ipc
            and row.get("rounds") == DEFAULT_ROUNDS and row.get("train_rounds") == c["train_rounds"].default
            and row.get("merge") == c["merge"].default and row.get("evidence_power") == c["evidence_power"].default
            and row.get("allocation") == d.allocation and row.get("count_noise") == COUNT_NOISE
            and row.get("factor", 1) == 1)


def _moved(row: dict) -> float | None:
    """Bytes up + down of a result row (None when the file did not record them)."""
    if "bytes_up_total" not in row:
        return None
    return float(row["bytes_up_total"]) + float(row.get("bytes_down_total", 0))


def _mb(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{np.mean(known) / 1e6:.1f}" if known else "–"


def scoreboard(results: list[dict]) -> list[str]:
    """The utility goal, cell by cell (5 sites, all 60,000 records, alpha x epsilon per site, split seed 0; other
    split seeds where measured): the mode the docs recommend for the cell (`medfdd.config.recommended_mode`) in its
    default configuration, mean over its noise draws, against the best DP-FedAvg setting (mean ± sd over its
    training seeds). A cell is won when ours is above DP-FedAvg's mean + 1 sd with >= 3 draws and seeds each."""
    cells: dict[tuple[int, float, float], dict] = {}
    for r in results:
        p = r.get("partition", {})
        if p.get("sites") != 5 or sum(p.get("site_totals", [])) != 60000:
            continue
        for row in r["rows"]:
            eps = eps_value(row.get("epsilon"))
            if p["alpha"] not in CELL_ALPHAS or eps not in CELL_EPS or "accuracy_mean" not in row:
                continue
            cell = cells.setdefault((p["seed"], p["alpha"], eps), {"ours": {}, "fed": [], "sites": p["site_totals"]})
            if row["method"].startswith(("dp-dm", "hybrid")):
                draws = cell["ours"].setdefault(_ours_key(r, row) + (_is_default(r, row), _mode(row)), {})
                seed = row.get("dm_seed", row.get("distill", {}).get("dm_seed", 0))
                draws[seed] = (row["accuracy_mean"], r["benchmark"], _moved(row))
            elif row["method"].startswith("DP-FedAvg"):
                cell["fed"].append(row)
    lines = ["### Scoreboard: medfdd against tuned DP-FedAvg, cell by cell", "",
             "5 sites, all 60,000 training records, split seed 0 (another split seed: its measured cells only). "
             "Ours: the mode the docs recommend for the cell (`medfdd prepare --mode auto`: hybrid at epsilon >= "
             f"{HYBRID_MIN_EPSILON:g}, alpha >= {HYBRID_MIN_ALPHA:g}, every site >= {HYBRID_MIN_SITE_RECORDS:,} "
             "records, else one-shot) in its default configuration (what "
             "`prepare` writes; only the data, split and budget set), under the honest-privacy defaults, mean ± sd "
             "over its noise draws; DP-FedAvg: its best setting, mean ± sd over its training seeds. Won: ours above "
             f"DP-FedAvg's mean + 1 sd, with at least {CELL_DRAWS} draws and seeds. Where the recommended default "
             "is not measured, the best other configuration is named (it does not count).",
             " MB moved: bytes up and down over all sites and rounds (models and synthetic sets as sent).",
             "", "| split | alpha | eps per site | recommended | ours % (draws) | configuration | MB moved | "
                 "DP-FedAvg % (seeds) | MB moved | won |", "|---|---|---|---|---|---|---|---|---|---|"]
    split_seeds = sorted({0} | {k[0] for k in cells})
    for split in split_seeds:
        for alpha in CELL_ALPHAS:
            for eps in CELL_EPS:
                if split != 0 and (split, alpha, eps) not in cells:
                    continue
                lines.append(_scoreboard_row(split, alpha, eps, cells.get((split, alpha, eps))))
    return lines + [""]


def _scoreboard_row(split: int, alpha: float, eps: float, cell: dict | None) -> str:
    cell = cell or {"ours": {}, "fed": [], "sites": [60000]}
    mode = recommended_mode(epsilon=eps, alpha=alpha, dp=True, site_records=cell["sites"])
    # a default configuration is honest by construction (_is_default asks for the DP record count)
    counted = {k: v for k, v in cell["ours"].items() if k[-1] == mode and k[-2]}
    ours = max(counted.items(), key=lambda kv: np.mean(_accuracies(kv[1])), default=None)
    fed = max(cell["fed"], key=lambda row: row["accuracy_mean"], default=None)
    fed_runs = same_setting_runs(fed, cell["fed"]) if fed else []
    f_txt = (f"{100 * np.mean(fed_runs):.1f}" + (f" ± {100 * np.std(fed_runs, ddof=1):.1f}" if len(fed_runs) > 1
                                                 else "") + f" ({len(fed_runs)})") if fed_runs else "–"
    f_mb = _mb([_moved(fed)] if fed else [])
    head = f"| {split} | {alpha:g} | {eps:g} | {mode} |"
    if ours is None:
        other = max(cell["ours"].items(), key=lambda kv: (_honest(kv[0]), np.mean(_accuracies(kv[1]))), default=None)
        note = "not measured" + ("" if other is None else (
            f"; best other: {100 * np.mean(_accuracies(other[1])):.1f} ({len(other[1])}), "
            f"{_config_text(other)}"))
        return f"{head} – | {note} | – | {f_txt} | {f_mb} | not measured |"
    o_acc = _accuracies(ours[1])
    o_txt = f"{100 * np.mean(o_acc):.1f}" + (f" ± {100 * np.std(o_acc, ddof=1):.1f}" if len(o_acc) > 1 else "")
    bar = np.mean(fed_runs) + (np.std(fed_runs, ddof=1) if len(fed_runs) > 1 else 0) if fed_runs else None
    if bar is None:
        won = "not measured"
    elif np.mean(o_acc) <= bar:
        won = "no"
    else:
        won = "yes" if len(o_acc) >= CELL_DRAWS and len(fed_runs) >= CELL_DRAWS else "ahead, too few runs"
    return (f"{head} {o_txt} ({len(o_acc)}) | {_config_text(ours)} | {_mb([m for *_, m in ours[1].values()])} | "
            f"{f_txt} | {f_mb} | {won} |")


def _accuracies(draws: dict) -> list[float]:
    return [a for a, *_ in draws.values()]


def _config_text(item: tuple[tuple, dict]) -> str:
    key, draws = item
    return (f"{key[0]}, {key[1]}" + ("" if key[-2] else ", not the default configuration") + "; "
            + ", ".join(sorted({b for _, b, _ in draws.values()}))
            + ("" if _honest(key) else "; measured before the honest-privacy defaults"))


ANCHOR_PRIVATE = {10: {"NDPDC": 77.7, "Dosser": 80.1}, 50: {"NDPDC": 78.8, "Dosser": 83.1}}


def _settings(row: dict) -> str:
    inner, evals = row.get("inner_steps", "?"), len(row.get("accuracies", []))
    return (f"real batch {row.get('batch_per_class', '?')}/class, {inner} update{'' if inner == 1 else 's'} per paid "
            f"statistic, {evals} evaluation training{'' if evals == 1 else 's'}")


def _headline_cells(central: list[dict], keep, describe) -> dict[tuple[int, float, str], dict]:
    """(ipc, epsilon, scale) -> the row `keep` selects, a later file winning over an earlier one, except files marked
    `"headline": false` (re-checks of an earlier configuration, e.g. on another CPU)."""
    return {(row["ipc"], eps_value(row["epsilon"]), r["scale"]): {**row, "source": r["benchmark"],
                                                              "settings": describe({**r, **row})}
            for r in central if r.get("headline", True) for row in r["rows"] if keep(row)}


def central_headline_rows(central: list[dict]) -> dict[tuple[int, float, str], dict]:
    """(ipc, epsilon, scale) -> our default DP-DM (decoupled, one statistic per update) row."""
    return _headline_cells(central, lambda row: row.get("schedule") == "decoupled"
                           and row.get("networks_per_update", 1) == 1, _settings)


def earlier_default_rows(central: list[dict], have: set) -> dict[tuple[int, float, str], dict]:
    """(ipc, epsilon, scale) -> the earlier default's row (interleaved, one update per paid statistic) for the cells
    the decoupled default has not been run at, so the headline shows every measured cell and says which is which."""
    rows = _headline_cells(
        central, lambda row: row.get("schedule", "interleaved") == "interleaved" and row.get("inner_steps", 1) == 1,
        lambda r: "interleaved, " + _settings({**r, "inner_steps": 1}))
    return {key: row for key, row in rows.items() if key not in have}


def headline_sources(rows: dict[tuple[int, float, str], dict], mark: str = "") -> list[str]:
    """Which file (and settings) each headline cell comes from: cells of one column can differ in settings."""
    by_file: dict[tuple[str, str, str], list[str]] = {}
    for (ipc, eps, scale), row in sorted(rows.items()):
        by_file.setdefault((scale, row["source"], row["settings"]), []).append(f"IPC {ipc} eps {eps:g}")
    return [f"- {mark}{scale.upper()} scale, {', '.join(cells)}: `{source}` ({settings})"
            for (scale, source, settings), cells in sorted(by_file.items())]


def headline(central: list[dict]) -> list[str]:
    """Our default (decoupled) DP-DM next to the private anchors, per IPC and epsilon: GPU and CPU scale."""
    best: dict[tuple, dict[str, str]] = {}
    rows = central_headline_rows(central)
    earlier = earlier_default_rows(central, set(rows))
    for mark, table in (("", rows), ("†", earlier)):
        for (ipc, eps, scale), row in table.items():
            best.setdefault((ipc, eps), {})[scale] = (f"{mark}{100 * row['accuracy_mean']:.1f} ± "
                                                      f"{100 * row['accuracy_sd']:.1f}")
    if not best:
        return []
    lines = ["### Headline: B1 central, our default DP-DM (decoupled) vs published private distillation", "",
             "| IPC | epsilon | ours, GPU scale | ours, CPU scale | NDPDC | Dosser |", "|---|---|---|---|---|---|"]
    for (ipc, eps) in sorted(best):
        anchors = ANCHOR_PRIVATE.get(ipc, {}) if eps == 1 else {}
        lines.append(f"| {ipc} | {eps:g} | {best[(ipc, eps)].get('gpu', '–')} | "
                     f"{best[(ipc, eps)].get('cpu', '–')} | {anchors.get('NDPDC', '–')} | "
                     f"{anchors.get('Dosser', '–')} |")
    lines += ["", "Anchors at epsilon 1 (see shared/BENCHMARKS.md); Dosser's numbers use an auxiliary public data set "
              "(SER) and 4x image parameterisation (PEA), neither of which medfdd uses. Details and ablations in the "
              "sections below. Where a cell was not rerun with a later configuration, cells of one column differ "
              "in settings (e.g. CPU scale, IPC 10: epsilon 1 with the large-site settings, 10 and inf without):",
              "", *headline_sources(rows), ""]
    if earlier:
        lines += ["† not yet rerun with the decoupled default: the earlier default (interleaved schedule, one update "
                  "per paid statistic), which the decoupled schedule beat at IPC 10, where both ran at CPU and GPU "
                  "scale (at IPC 1, CPU scale, they were level):", "", *headline_sources(earlier), ""]
    return lines


def _eps(x) -> str:
    return "∞" if x == "inf" else f"{x:.3g}"


def b3_section(r: dict) -> list[str]:
    """Worst case over sites (and the consortium) per epsilon, attack and target."""
    setting = r.get("setting", "worst-case")
    nonmembers = [k for row in r["rows"] for k in (row.get("n_nonmembers") or {}).values()]
    typical = sorted(nonmembers)[len(nonmembers) // 2] if nonmembers else 50
    d = r["distill"]
    shadows = (f"LiRA with {r['shadows']} shadow pipelines, " if any("lira" in a for a in
                                                                    r.get("attacks", ["lira"])) else "no LiRA, ")
    about = {"worst-case": "This configuration is the worst case for leakage (tiny sites, ipc close to the records per "
                           "class, no augmentation), not a utility setting: under DP its global model is near chance.",
             "utility": "This configuration is a utility setting (sites of thousands of records, medfdd's "
                        "distillation defaults: feature centring and augmentation, in training too), so the rows "
                        "audit models that learned the task (accuracy in the last column), not chance."}[setting]
    canaries = (f"{r['canaries']} canaries (one-run audit), " if "canary" in r.get("attacks", ["canary"])
                else "no canaries, ")
    lines = [f"### B3 leakage, {r['dataset']}" + ("" if setting == "worst-case" else f", {setting} setting")
             + f": `{r['benchmark']}`", "",
             f"{_prov(r)}; {r['partition']['sites']} sites (Dirichlet alpha {r['partition']['alpha']:g}, at most "
             f"{r['partition']['max_per_class']} images per class, half of each site kept as the audit holdout), "
             f"DM ipc {d['ipc']}, {d['iterations']} paid steps of {d['batch_size']} records x {d['inner_steps']} "
             f"updates, global model {r['train']['epochs']} epochs; {shadows}"
             f"{canaries}bounds at {100 * r['confidence']:.0f} % confidence. "
             f"Each cell is the worst case over the sites and the consortium. With about {typical} non-members per "
             f"site, TPR at 0.1 % FPR is {'the TPR at zero false positives' if typical < 1000 else 'resolved'}. "
             f"{about} (p): for files that record it, the chance that scores carrying no membership reach that AUC, "
             "per patient (one-sided Mann-Whitney), for that one row; with many rows compare it with 0.05 / rows."
             + (f" {r['note']}" if r.get("note") else ""), "",
             "| epsilon (per site) | attack | target | AUC (p) | TPR @ 0.1 % FPR | TPR @ 1 % FPR | epsilon lower bound "
             "(method) | epsilon accounted | global accuracy % |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        groups: dict[tuple[str, str], list[dict]] = {}
        for x in row["results"]:
            groups.setdefault((x["attack"], x["target"]), []).append(x)
        acc_text = "–" if row.get("accuracy") is None else f"{100 * row['accuracy']:.1f}"
        for (attack, target), xs in groups.items():
            lb = max(xs, key=lambda x: float(x["epsilon_lower_bound"]))
            accounted = max(float(x["epsilon_accounted"]) for x in xs)
            top = max(xs, key=lambda x: x["auc"])
            p = f" ({top['auc_p_value']:.2g})" if top.get("auc_p_value") is not None else ""
            lines.append(f"| {_eps(row['epsilon'])} | {attack} | {target} | {top['auc']:.3f}{p} | "
                         f"{max(x['tpr_at_fpr_0.001'] for x in xs):.3f} | {max(x['tpr_at_fpr_0.01'] for x in xs):.3f} "
                         f"| {_eps(lb['epsilon_lower_bound'])} ({lb['epsilon_lower_bound_method'].replace('_', '-')}) "
                         f"| {_eps('inf' if math.isinf(accounted) else accounted)} | {acc_text} |")
    return lines + [""]


def scale_sections() -> list[str]:
    """B2 parallel decoding (1 vs 2 workers), out-of-core sites and 3D sites (peak RSS, s / paid step against site
    size)."""
    lines = []
    dec = _load("decoding_workers")
    if dec:
        lines += ["### B2 parallel decoding (scans/s, cache off)", "", _prov(dec), "", f"Note: {dec['note']}.", "",
                  "| case | scans | workers | whole load | start-up s | after the first scan | same arrays |",
                  "|---|---|---|---|---|---|---|"]
        for r in dec["rows"]:
            lines.append(f"| {r['case']} | {r['scans']} | {r['workers']} | {r['per_s']:.0f} | {r['startup_s']:.1f} | "
                         f"{r['steady_per_s']:.0f} | {'yes' if r['identical_to_first'] else 'NO'} |")
        lines += ["", "![decoding workers](decoding_workers.png)", ""]
    for name in ("site_scale", "site_scale_png_50k"):
        lines += _site_scale_section(name)
    audit = _load("audit_scale")
    if audit:
        lines += ["### Out-of-core audit: the audit's attacks against the records at a site", "", _prov(audit), "",
                  f"{audit['spatial']}x{audit['spatial']} records in one memory-mapped .npy; per row one fresh "
                  "process runs the loss attack, DCR, 2 LiRA shadow pipelines and the 64-canary run on the pool, "
                  "given as a RecordView (read by index) or as one array (the earlier `data.images[pool]`); glibc "
                  f"mmap threshold {audit.get('mmap_threshold', 0) or 'dynamic (default)'}. Note: {audit['note']}"
                  + ("" if audit.get("complete") else " (partial: the run did not finish)") + ".", "",
                  "| records | pool given as | peak RSS MiB | seconds |", "|---|---|---|---|"]
        for r in audit["rows"]:
            lines.append(f"| {r['records']} | {r['mode']} | "
                         + (f"{r['peak_rss_mb']:.0f} | {r['total_s']:.0f} |" if "peak_rss_mb" in r else "failed | |"))
        lines += ["", "![audit scale](audit_scale.png)", ""]
    for vol_name in ("volumes_3d", "volumes_3d_budget256mib", "volumes_3d_128"):
        vol = _load(vol_name)
        if not vol:
            continue
        d = vol["distill"]
        side = vol["spatial_size"][0]
        lines += [f"### 3D sites at {side}^3: `site distill` against the number of volumes (`{vol_name}`)", "",
                  _prov(vol), "",
                  f"{vol['source']}; NIfTI loaded with orientation RAS, {vol['spacing_mm']:g} mm spacing, crop or pad "
                  f"to {side}^3; DP-DM (epsilon 1), width {d['width']}, ipc {d['ipc']}, expected batch {d['batch_size']}, "
                  f"{d['inner_steps']} update(s) per statistic, {vol['steps']} paid steps, one fresh process per row "
                  f"(warm shared cache). Peak RSS spread across the sizes: "
                  + (f"{100 * vol['rss_spread']:.0f} %" if "rss_spread" in vol else "n/a")
                  + f". Note: {vol['note']}" + ("" if vol.get("complete") else " (partial: the run did not finish)")
                  + ".", "", "| volumes | peak RSS MiB | load s | s / paid step | synthetic NIfTI |",
                  "|---|---|---|---|---|"]
        for r in vol["rows"]:
            if "peak_rss_mb" in r:
                rel = r.get("release", {})
                nifti = f"{rel.get('axcodes')}, {rel.get('voxel_mm')} mm, orthonormal {rel.get('orthonormal')}"
                lines.append(f"| {r['volumes']} | {r['peak_rss_mb']:.0f} | {r['load_s']:.1f} | "
                             f"{r['seconds_per_paid_step']:.1f} | {nifti} |")
            else:
                lines.append(f"| {r['volumes']} | failed | | | |")
        lines += ["", f"![volumes 3d]({vol_name}.png)", ""]
    return lines


def stacked_networks_section() -> list[str]:
    """Seconds per paid step and per network evaluation against the statistics matched per synthetic update
    (benchmarks/stacked_networks.py); accuracy at a given G is in the B1 central sections (`--networks-per-update`)."""
    lines = []
    for name in sorted(p.stem for p in RESULTS.glob("stacked_networks_*.json")):
        r = _load(name)
        lines += [f"### Stacked matching networks: `{name}`", "", _prov(r), "",
                  f"A decoupled DP-DM run on a {r['site_records']:,}-record Fashion-MNIST site, IPC {r['ipc']}, "
                  f"width {r['width']}, {r['batch_per_class']} real records per class per paid step, {r['inner']} "
                  f"network evaluations per paid statistic, G of them stacked into one grouped network per "
                  f"synthetic update (the same networks and the same paid bank at every G); {r['threads']} "
                  f"thread(s). (chunked): the G networks' activations exceed the activation budget "
                  f"(`nets.ACTIVATION_BUDGET`), so each update embeds twice (DM's chunked path). Note: {r['note']}.", "",
                  "| G | paid steps | updates | s / paid step | bank s | update s | s / network evaluation | "
                  "TFLOP/s | of bf16 peak |", "|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            frac = row.get("fraction_of_bf16_peak")
            chunked = " (chunked)" if row.get("chunked_updates") else ""
            lines.append(f"| {row['networks_per_update']}{chunked} | {row['paid_steps']} | {row['updates']} | "
                         f"{row['seconds_per_paid_step']:.3f} | {row['bank_seconds']:.1f} | "
                         f"{row['update_seconds']:.1f} | {row['seconds_per_network_evaluation']:.4f} | "
                         f"{row['tflops_achieved']:.3f} | {f'{100 * frac:.2f} %' if frac else 'n/a'} |")
        lines.append("")
    return lines


def _site_scale_section(name: str) -> list[str]:
    """`site distill`'s peak RSS and seconds per paid step against the site's size (benchmarks/site_scale.py)."""
    scale = _load(name)
    if not scale:
        return []
    fmt = {"png": "8-bit PNG"}.get(scale.get("format", "dcm"), "DICOM")
    lines = [f"### Out-of-core sites: `site distill` against site size ({fmt} scans)", "", _prov(scale), "",
             f"28x28 {fmt} scans preprocessed to {scale['spatial']}x{scale['spatial']}, DP-DM, {scale['steps']} paid "
             f"steps, one fresh process per row (warm shared cache). Note: {scale['note']}"
             + ("" if scale.get("complete") else " (partial: the run did not finish)") + ".", "",
             "| scans | code | peak RSS MiB | load s | s / paid step |", "|---|---|---|---|---|"]
    for r in scale["rows"]:
        if "peak_rss_mb" in r:
            lines.append(f"| {r['scans']} | {r['code']} | {r['peak_rss_mb']:.0f} | {r['load_s']:.1f} | "
                         f"{r['seconds_per_paid_step']:.2f} |")
        else:
            lines.append(f"| {r['scans']} | {r['code']} | failed | | |")
    return lines + ["", f"![site scale]({name}.png)", ""]


def many_sites_section() -> list[str]:
    """The coordinator's peak RSS and seconds per round against the number of sites (benchmarks/many_sites.py)."""
    r = _load("many_sites")
    if not r:
        return []
    lines = ["### Many sites: the coordinator's round against the number of sites", "", _prov(r), "",
             f"{r['what']}; engine: {r['engine']}.", "",
             "| sites | merged images | peak RSS MiB | RSS before the round MiB | round s | train s |",
             "|---|---|---|---|---|---|"]
    for p in r["points"]:
        lines.append(f"| {p['sites']} | {p['n_merged']} | {p['peak_rss_mb']:.0f} | {p['rss_before_round_mb']:.0f} | "
                     f"{p['seconds_round']:.1f} | {p['seconds_by_phase']['train']:.1f} |")
    f, g, t = r["fit_peak_rss_mb"], r["fit_round_growth_mb"], r["fit_seconds_round"]
    lines += ["", f"Linear fits against the number of sites: peak RSS {f['per_site']:+.1f} MiB / site (R² "
              f"{f['r2']:.3f}), growth during the round {g['per_site']:+.1f} MiB / site (R² {g['r2']:.3f}), "
              f"{t['per_site']:+.3f} s / site per round (R² {t['r2']:.3f}).", ""]
    return lines


def main() -> None:
    lines = ["# Benchmark results", "", "Generated by `benchmarks/report.py` from the JSON files here; never part of "
             "`make test`.", "", "Files whose commit predates `c0af37e` ran ConvNet-3 with conv biases; since then the "
             "convolutions have none (instance norm subtracts a bias exactly, so the networks compute the same "
             "functions; only the random initialisation stream differs). CPU files whose commit predates `d93ae12` "
             "embedded the real records under bf16 autocast (precision auto then meant bf16 on every CPU); since then "
             "a CPU without native bf16 uses fp32, 10x faster for that embedding on the AVX2-only EPYC of "
             "2026-12-01. The CPUs of these sessions differ (some had native bf16), so compare s / iteration only "
             "within one file. Interleaved-schedule rows (ablations, not the default) whose commit predates `88a5f9f` drew "
             "the real records' augmentation family per 256-record chunk instead of once per paid statistic, so with "
             "more than 256 sampled records one record could change the augmentation of others and the sensitivity C "
             "the noise assumed was not guaranteed; the decoupled default always drew one family per statistic. "
             "DP-FedAvg rows whose commit predates `78f1410` accounted sample rate batch / n and round(n / batch) "
             "steps per epoch instead of the 1 / ceil(n / batch) and ceil(n / batch) Opacus's Poisson loader ran; "
             "recomputed for 122 site sizes between 500 and 20,000 records (batch 64, 3 rounds, epsilon 1; 60 of them also "
             "at epsilon 10), the "
             "epsilon actually spent was 0.94-0.999 of the one reported, so those rows stayed within their budgets.", "", "## Anchors (Fashion-MNIST, ConvNet-3, from shared/BENCHMARKS.md)", "", ANCHORS, "",
             "## Ours", ""]
    central = [_load(p.stem) for p in sorted(RESULTS.glob("b1_central*.json"))]
    central = [r for r in central if r.get("rows") and "accuracy_mean" in r["rows"][0]]  # not --profile files
    central.sort(key=lambda r: ("interleaved" in r["benchmark"], r["scale"] != "gpu", r["benchmark"]))
    fed = [_load(p.stem) for p in sorted(RESULTS.glob("b1_federated*.json"))]
    fed = [r for r in fed if all("accuracy_mean" in row for row in r["rows"])]  # not per-round progress records
    figures = write_figures(RESULTS, central_headline_rows(central), ANCHOR_PRIVATE, fed)
    lines += headline(central)
    if "b1_central.png" in figures:
        lines += ["![B1 central: accuracy against epsilon per IPC](b1_central.png)", ""]
    for result in central:
        lines += b1_section(result)
    hybrid = [_load(p.stem) for p in sorted(RESULTS.glob("b4_hybrid*.json"))]
    if fed:
        lines += scoreboard(fed + hybrid)
        lines += federated_headline(fed)
        if "b1_federated.png" in figures:
            lines += ["![B1 federated: accuracy against epsilon per split](b1_federated.png)", "",
                      "Dotted lines: non-private references on the same split; the thin grey line marks the 80 % "
                      "target. Points: the README's federated configuration (CPU scale, 128 real records per class "
                      "per paid step, 10 updates per paid statistic, evidence allocation and merge, 100 paid steps in "
                      "1 round or 3 rounds of 34), error bars ± sd over the evaluation trainings.", ""]
        lines += federated_section(fed)
    for name in sorted(p.stem for p in RESULTS.glob("b1_merge_study*.json")):
        lines += merge_study_section(_load(name))
    reuse = _load("reuse_digits")
    if reuse:
        lines += ["### Reusing paid statistics (3 digits hospitals, DP-DM, epsilon 1 per site)", "", _prov(reuse), "",
                  "Same number of synthetic updates (100), spent as paid steps x updates per paid statistic.", "",
                  "| paid steps | updates per statistic | accuracy % (mean ± sd) | distill s (3 sites) |",
                  "|---|---|---|---|"]
        for row in reuse["rows"]:
            lines.append(f"| {row['paid_steps']} | {row['inner_steps']} | {100 * row['accuracy_mean']:.1f} ± "
                         f"{100 * row['accuracy_sd']:.1f} | {row['distill_seconds_3_sites']:.0f} |")
        lines.append("")
    for name in sorted(p.stem for p in RESULTS.glob("b3_*.json")):
        lines += b3_section(_load(name))
    loading = _load("loading")
    if loading:
        lines += ["### B2 data loading (scans/s, read + validate + preprocess through MONAI)", "", _prov(loading), "",
                  "| case | scans | no cache | cache, cold | cache, warm | warm speed-up |", "|---|---|---|---|---|---|"]
        for row in loading["rows"]:
            lines.append(f"| {row['case']} | {row['scans']} | {row['no_cache_per_s']:.0f} | "
                         f"{row['cache_cold_per_s']:.0f} | {row['cache_warm_per_s']:.0f} | "
                         f"x{row['warm_speedup']:.1f} |")
        lines += ["", "dicom28 / nifti28: 28x28 images; ct512: 512x512 int16 CT with RescaleSlope/Intercept, CT window, "
                  "resized to 128x128 (anti-aliased).", ""]
    lines += scale_sections()
    lines += stacked_networks_section()
    lines += many_sites_section()
    (RESULTS / "README.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'README.md'}")


if __name__ == "__main__":
    main()
