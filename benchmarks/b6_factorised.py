"""B6 factorised synthetic images (multi-formation: IDC, Kim et al., ICML 2022; IDM, Zhao et al., CVPR 2023; the
4x image parameterisation of Dosser): more training images per stored synthetic byte, at no privacy cost.

Each stored slot of H x W holds f x f sub-images of (H/f) x (W/f); decoding splits the slot and upsamples each part
back to H x W (bilinear), so ipc slots per class release ipc * f^2 training images per class for the same bytes. The
paid statistics (the decoupled DM bank), sigma, q and steps are those of b1_central for the same arguments and do
not depend on f (asserted: every f runs the same plan and pays a bit-identical bank); the matching step decodes the
slots, so f only changes post-processing. f = 1 is the plain distiller (`--check-plain` asserts equal images).

Experiment only: the site runner and the offer contracts are untouched.
Run: `.venv/bin/python benchmarks/b6_factorised.py --ipc 1 --eps 1 --factor 1 2 --max-per-class 2000`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from b1_central import SCALES, eval_accuracies, load_data, make_distiller, scale_from  # noqa: E402
from common import COUNT_NOISE, RESULTS, peak_memory_mb, write_result  # noqa: E402

from medfdd.distill.base import DistillState  # noqa: E402
from medfdd.distill.distribution_matching import DistributionMatching, SignalBank  # noqa: E402
from medfdd.training import pick_device  # noqa: E402


@dataclass
class Decoded:
    """What one matching update sees: the decoded images (a differentiable function of the slots) and their labels;
    the optimiser still steps the stored slots."""

    images: torch.Tensor
    labels: torch.Tensor
    slots: DistillState


def decode(slots: torch.Tensor, factor: int) -> torch.Tensor:
    """[N, C, H, W] slots -> [N * f^2, C, H, W]: each slot's f x f tiles (row-major, consecutive per slot), each
    upsampled bilinearly to H x W (IDC's multi-formation). f = 1 returns the slots themselves."""
    if factor == 1:
        return slots
    n, c, h, w = slots.shape
    tiles = slots.reshape(n, c, factor, h // factor, factor, w // factor).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n * factor * factor, c, h // factor, w // factor)
    return F.interpolate(tiles, size=(h, w), mode="bilinear", align_corners=False)


class FactorisedDM(DistributionMatching):
    """DP distribution matching whose synthetic parameters are the stored slots and whose matching step decodes
    them. Each update matches the decoded set exactly as plain DM matches a set of ipc * f^2 images per class (the
    class weight n_c / ipc counts decoded images over ipc * f^2); the bank, its centres (from the noise slots) and
    every random stream are the parent's, so the paid statistics do not depend on f."""

    def __init__(self, *args, factor: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        h, w = self.image_shape[-2:]
        if factor < 1 or h % factor or w % factor:
            raise ValueError(f"--factor {factor} must divide the image size {h} x {w}")
        self.factor = factor
        self.paid: SignalBank | None = None  # the bank this run paid (kept to compare banks across f)

    def bank(self, x, y, init_images, on_paid=None) -> SignalBank:
        self.paid = super().bank(x, y, init_images, on_paid)
        return self.paid

    def decoded_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.repeat_interleave(self.factor ** 2)

    def match(self, state, targets, g) -> float:
        if self.factor == 1:
            return super().match(state, targets, g)
        view = Decoded(decode(state.images, self.factor), self.decoded_labels(state.labels), state)
        return super().match(view, targets, g)

    def sgd_update(self, state, loss: torch.Tensor) -> None:
        if isinstance(state, Decoded):  # weight n_c / (ipc f^2), then DM's optimiser on the slots
            return super().sgd_update(state.slots, loss / self.factor ** 2)
        return super().sgd_update(state, loss)

    def sgd_step(self, state, grad: torch.Tensor) -> None:
        """The chunked path (a decoded set too large to embed with one graph) hands over the gradient with respect
        to the decoded images: carry it back through the decoding to the slots, weighted as in `sgd_update`."""
        if isinstance(state, Decoded):
            (slot_grad,) = torch.autograd.grad(state.images, state.slots.images, grad_outputs=grad)
            return super().sgd_step(state.slots, slot_grad / self.factor ** 2)
        return super().sgd_step(state, grad)

    def release(self, state: DistillState) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoded images, labels): the ipc * f^2 training images per class the slots yield."""
        return decode(state.result(), self.factor), self.decoded_labels(state.labels)


def same_bank(a: SignalBank, b: SignalBank) -> bool:
    return (len(a.sums) == len(b.sums) and all(torch.equal(u, v) for u, v in zip(a.sums, b.sums, strict=True))
            and torch.equal(a.pooled_counts, b.pooled_counts) and a.families == b.families
            and a.feature_scale == b.feature_scale)


def run_cell(x, y, xt, yt, *, ipc: int, eps: float, factors: list[int], scale: dict, evals: int, device, seed: int,
             count_noise: float | None, check_plain: bool, on_row) -> list[dict]:
    """Every f on one plan (b1_central's `make_distiller`): distill, decode, evaluate; rows in the order of f."""
    plain, sigma, spent, q, steps = make_distiller(n=len(x), image_shape=tuple(x.shape[1:]), ipc=ipc, eps=eps,
                                                   scale=scale, method="dm", device=device, seed=seed,
                                                   count_noise=count_noise)
    if plain.cfg.schedule != "decoupled":
        raise SystemExit("b6_factorised: --schedule decoupled only (the bank is what is compared across f)")
    xd, yd = torch.as_tensor(x).to(device), torch.as_tensor(y).to(device)
    rows, first_bank = [], None
    plain_images = None
    if check_plain:
        plain_images = plain.run(xd, yd).result().cpu()
    for f in factors:
        dist = FactorisedDM(plain.cfg, plain.plan, num_classes=10, image_shape=plain.image_shape, seed=seed,
                            device=device, factor=f)
        assert dist.plan == plain.plan, "the privacy plan must not depend on f"
        w0, c0 = time.perf_counter(), time.process_time()
        state = dist.run(xd, yd)
        distill_s, distill_cpu = time.perf_counter() - w0, time.process_time() - c0
        if first_bank is None:
            first_bank = dist.paid
        assert same_bank(first_bank, dist.paid), "the paid statistics must not depend on f"
        if f == 1 and plain_images is not None:
            assert torch.equal(state.result().cpu(), plain_images), "f = 1 must reproduce the plain distiller"
        images, labels = dist.release(state)
        images, labels = images.cpu().numpy(), labels.cpu().numpy()
        w1, c1 = time.perf_counter(), time.process_time()
        accs = eval_accuracies(images, labels, xt, yt, evals=evals, epochs=scale["eval_epochs"], device=device)
        eval_s, eval_cpu = time.perf_counter() - w1, time.process_time() - c1
        slot_bytes = state.result().numel() * 4  # float32, as the site writes its release
        row = {"factor": f, "ipc_slots": ipc, "images_per_class": ipc * f * f, "released_images": len(labels),
               "stored_bytes_float32": slot_bytes, "decoded_bytes_float32": int(images.size) * 4,
               "bytes_per_training_image": slot_bytes / len(labels),
               "epsilon": "inf" if not math.isfinite(eps) else eps,
               "epsilon_accounted": "inf" if not math.isfinite(eps) else spent, "noise_multiplier": sigma,
               "sample_rate": q, "paid_steps": steps, "records": len(x),
               "same_bank_as_first_factor": True, "plain_equal_checked": bool(f == 1 and check_plain),
               "accuracy_mean": float(np.mean(accs)),
               "accuracy_sd": float(np.std(accs, ddof=1)) if evals > 1 else 0.0, "accuracies": accs,
               "distill_seconds": distill_s, "distill_cpu_seconds": distill_cpu, "eval_seconds": eval_s,
               "eval_cpu_seconds": eval_cpu, "eval_epochs": scale["eval_epochs"], "evals": evals,
               "inner_steps": dist.cfg.updates_per_statistic, "lr": dist.cfg.lr, "ema": dist.cfg.ema}
        print(json.dumps(row), flush=True)
        rows.append(row)
        on_row(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0])
    ap.add_argument("--factor", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--scale", choices=SCALES, default="cpu")
    ap.add_argument("--evals", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="b6_factorised", help="results file name")
    ap.add_argument("--iterations", type=int, default=None, help="override the scale's paid DP steps")
    ap.add_argument("--batch-per-class", type=int, default=None, help="override the scale's real batch per class")
    ap.add_argument("--eval-epochs", type=int, default=None, help="override the scale's evaluation epochs")
    ap.add_argument("--inner-steps", type=int, default=None, help="override the synthetic updates per statistic")
    ap.add_argument("--max-per-class", type=int, default=None, help="at most this many training records per class")
    ap.add_argument("--check-plain", action="store_true", help="also run the plain distiller; assert f=1 equals it")
    ap.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx .gz files")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--count-noise", type=float, default=COUNT_NOISE, help="as b1_central")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--note", default=None, help="free text stored in the JSON")
    args = ap.parse_args()
    args.schedule = "decoupled"
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y, xt, yt = load_data(args.data_dir, args.max_per_class, args.seed)
    device = pick_device()
    scale = scale_from(args)
    meta = {"dataset": "fashion-mnist (Debian dataset-fashion-mnist)", "partition": "central", "scale": args.scale,
            **scale, "max_per_class": args.max_per_class, "records": len(x), "factors": args.factor,
            "threads": torch.get_num_threads(), "seed": args.seed, "decode": "f x f tiles, bilinear upsampling",
            "note": args.note}
    done: list[dict] = []

    def save(rows: list[dict], complete: bool = False) -> Path:
        return write_result(args.name, {**meta, "complete": complete, "rows": done + rows,
                                        "peak_memory_mb": peak_memory_mb()}, out_dir=args.out_dir)

    for ipc in args.ipc:
        for eps in args.eps:
            done += run_cell(x, y, xt, yt, ipc=ipc, eps=eps, factors=args.factor, scale=scale, evals=args.evals,
                             device=device, seed=args.seed, count_noise=args.count_noise or None,
                             check_plain=args.check_plain, on_row=save)
    print(f"wrote {save([], complete=True)}")


if __name__ == "__main__":
    main()
