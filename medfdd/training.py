"""Train a classifier (ConvNet-3, or a MONAI network) on a (synthetic) set and evaluate it: the protocol of DC/DSA/DM.

SGD (momentum 0.9, weight decay 5e-4), learning rate divided by 10 at half the epochs, DSA augmentation.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score
from torch import nn

from medfdd.augment import FAMILIES, augment
from medfdd.nets import CONVNET, model_chunk, model_for


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 300
    lr: float = 0.01
    batch_size: int = 256
    width: int = 128
    augment: bool = True
    flip: bool = False
    architecture: str = CONVNET  # or an allow-listed MONAI network (medfdd.nets.monai_nets); `width` is ConvNet-3's


def as_tensor(a, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """`torch.as_tensor`, except that a read-only array (a site's memory-mapped records) is copied: torch cannot
    share read-only memory (it warns, and a write through the tensor would be undefined). A tensor (e.g. a batch
    read from a `RecordView`) is converted, not copied through numpy."""
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype)
    a = np.asarray(a)
    return torch.as_tensor(a if a.flags.writeable else np.array(a), dtype=dtype, device=device)


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, settings: TrainSettings, *,
                     seed: int, device: torch.device | None = None, weights: np.ndarray | None = None,
                     on_epoch: Callable[[int], None] | None = None, init: nn.Module | None = None) -> nn.Module:
    """`weights` (one per image, e.g. class-balanced merging) weight the cross-entropy of each example;
    `on_epoch(epochs_done)` is called after each epoch (a progress bar; it must not touch the model). `init`: start
    from a copy of this model (fine-tuning; `settings.architecture` and `width` are then unused) instead of a fresh seeded one.
    `images` may also be a tensor or a `medfdd.data.records.RecordView` (a site's records, out of core: each batch is
    then read by index)."""
    device = device or pick_device()
    x = as_tensor(images, device=device) if isinstance(images, np.ndarray | torch.Tensor) else images.to(device)
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device)
    model = (model_for(tuple(x.shape[1:]), num_classes, architecture=settings.architecture, width=settings.width,
                       seed=seed) if init is None else copy.deepcopy(init)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[settings.epochs // 2], gamma=0.1)
    g = torch.Generator().manual_seed(seed)
    families = FAMILIES + (("flip",) if settings.flip else ())
    micro = model_chunk(model, tuple(x.shape[1:]), backward=True, cap=settings.batch_size)
    model.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(len(x), generator=g).to(device)
        for start in range(0, len(x), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            xb = augment(x[idx], g, families) if settings.augment else x[idx]
            opt.zero_grad(set_to_none=True)
            if len(idx) <= micro:
                if w is None:
                    loss = F.cross_entropy(model(xb), y[idx])
                else:
                    loss = (w[idx] * F.cross_entropy(model(xb), y[idx], reduction="none")).sum() / w[idx].sum()
                loss.backward()
            else:  # volumes: the batch's gradient accumulated a micro-batch at a time (memory of one micro-batch)
                wb = torch.ones(len(idx), device=device) if w is None else w[idx]
                for s in range(0, len(idx), micro):
                    part = slice(s, s + micro)
                    (wb[part] * F.cross_entropy(model(xb[part]), y[idx][part], reduction="none")).sum().div(
                        wb.sum()).backward()
            opt.step()
        sched.step()
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return model.eval()


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Class probabilities, `batch_size` images at a time (default: as many as fit `nets.records_per_chunk`, at
    most 1,024)."""
    device = next(model.parameters()).device
    batch_size = batch_size or model_chunk(model, tuple(images.shape[1:]), cap=1024)
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        xb = as_tensor(images[start:start + batch_size], device=device)
        out.append(torch.softmax(model(xb).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def classification_metrics(proba: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """accuracy, balanced accuracy, macro one-vs-rest AUC (classes present in `labels`), per-class recall, confusion."""
    pred = proba.argmax(1)
    present = np.unique(labels)
    try:
        p = proba[:, present] / proba[:, present].sum(1, keepdims=True)
        auc = float(roc_auc_score(labels, p, multi_class="ovr", average="macro", labels=present)) \
            if len(present) > 2 else float(roc_auc_score(labels == present[1], p[:, 1])) if len(present) == 2 \
            else float("nan")
    except ValueError:
        auc = float("nan")
    cm = confusion_matrix(labels, pred, labels=list(range(num_classes)))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(cm.sum(1) > 0, np.diag(cm) / cm.sum(1), np.nan)
    with warnings.catch_warnings():  # a site may lack classes the model predicts: recall averages present ones
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(labels, pred))
    return {"accuracy": float((pred == labels).mean()), "balanced_accuracy": balanced,
            "auc": auc, "per_class_recall": [None if np.isnan(r) else float(r) for r in recall],
            "confusion_matrix": cm.tolist(), "n": int(len(labels))}


def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    return classification_metrics(predict_proba(model, images), np.asarray(labels), num_classes)
