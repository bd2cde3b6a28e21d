"""B1 federated, coordinator side only: how the merge of the same site offers changes the global model's accuracy.

Reads the site offers a `b1_federated.py --save-merged DIR` run wrote (`site-*_eps{E}_rounds{R}_r{r}.npz`: images,
labels, class_evidence), merges them with the coordinator's own `merge` under each strategy (and evidence power),
trains the global ConvNet-3 `--evals` times each and evaluates on the Fashion-MNIST test split. The offers are DP
outputs, so every variant here is post-processing of the same releases: no extra privacy cost.
Run: `.venv/bin/python benchmarks/b1_merge_study.py DIR --tag eps1_rounds1_r1 --name NAME [--powers 1 2 3]`.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from b1_federated import FIRST_EXTRA_SEED, K, merged_accuracy, test_split  # noqa: E402
from common import peak_memory_mb, write_result  # noqa: E402

from medfdd.config import CoordinatorConfig  # noqa: E402
from medfdd.coordinator.merge import merge  # noqa: E402
from medfdd.coordinator.validate import AcceptedOffer  # noqa: E402
from medfdd.prepare.sources import load_fashion_mnist  # noqa: E402
from medfdd.training import pick_device  # noqa: E402


def load_offers(folder: Path, tag: str) -> list[AcceptedOffer]:
    offers = []
    for path in sorted(folder.glob(f"site-*_{tag}.npz")):
        with np.load(path, allow_pickle=False) as z:
            x, y = z["images"], z["labels"]
            offers.append(AcceptedOffer(path.name.split("_")[0], x, y, {"class_evidence": z["class_evidence"].tolist()},
                                        x.nbytes + y.nbytes))
    if not offers:
        raise SystemExit(f"{folder}: no site-*_{tag}.npz offers (write them with b1_federated.py --save-merged)")
    return offers


def round_of(tag: str) -> int:
    m = re.fullmatch(r"eps[^_]+_rounds\d+_r(\d+)", tag)
    if m is None:
        raise SystemExit(f"--tag {tag!r}: expected eps{{E}}_rounds{{R}}_r{{r}}, e.g. eps1_rounds3_r3")
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--tag", default="eps1_rounds1_r1", help="which saved round: eps{E}_rounds{R}_r{r}")
    ap.add_argument("--name", required=True)
    ap.add_argument("--merges", nargs="+", default=["concat", "balanced", "evidence"])
    ap.add_argument("--powers", type=float, nargs="+", default=[1.0, 2.0, 3.0], help="evidence powers to try")
    ap.add_argument("--evals", type=int, default=3)
    ap.add_argument("--eval-epochs", type=int, default=300)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    offers = load_offers(args.folder, args.tag)
    round_seed = round_of(args.tag)  # b1_federated.py's merge and first evaluation seed: seed 0 + round
    test = test_split(load_fashion_mnist())
    device = pick_device()
    variants = [(m, p) for m in args.merges for p in (args.powers if m == "evidence" else [2.0])]
    rows = []
    for strategy, power in variants:
        cfg = CoordinatorConfig(sites=[Path("x.yaml")], output=Path("x"), merge=strategy, evidence_power=power)
        merged = merge(offers, cfg, num_classes=K, seed=round_seed)
        t = time.perf_counter()
        seeds = [round_seed] + [FIRST_EXTRA_SEED + e for e in range(args.evals - 1)]  # the first: the run's own
        accs = [merged_accuracy(merged, test, epochs=args.eval_epochs, seed=s, device=device) for s in seeds]
        row = {"merge": strategy, **({"evidence_power": power} if strategy == "evidence" else {}),
               "accuracy_mean": float(np.mean(accs)), "accuracy_sd": float(np.std(accs, ddof=1)) if len(accs) > 1
               else 0.0, "accuracies": accs, "seconds": time.perf_counter() - t}
        rows.append(row)
        print(row, flush=True)
    out = write_result(args.name, {"dataset": "fashion-mnist (Debian dataset-fashion-mnist)",
                                   "offers": str(args.folder / f"site-*_{args.tag}.npz"),
                                   "sites": [o.site_id for o in offers], "eval_epochs": args.eval_epochs,
                                   "rows": rows, "peak_memory_mb": peak_memory_mb(), "note": args.note})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
