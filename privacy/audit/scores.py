"""Per-record statistics an attacker computes from a released artifact (higher = more member-like).

- model target (the global model): cross-entropy loss (Yeom et al., "Privacy Risk in Machine Learning", CSF 2018)
  and the logit-scaled confidence log(p_y / (1 - p_y)) LiRA models as Gaussian (Carlini et al., S&P 2022, Sec. IV).
- synthetic target (a released synthetic set): distance to the closest synthetic record, DCR (as used to audit
  synthetic data, e.g. Zhao et al. 2021; Yale et al. 2019), in pixel space.
"""

from __future__ import annotations

import numpy as np
import torch

from medfdd.nets import model_chunk
from medfdd.training import as_tensor


@torch.no_grad()
def logits(model: torch.nn.Module, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    device = next(model.parameters()).device
    batch_size = batch_size or model_chunk(model, tuple(images.shape[1:]), cap=1024)  # volumes: a few at a time
    model.eval()
    out = [model(as_tensor(images[i:i + batch_size], device=device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 0))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def loss_scores(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Negative cross-entropy of each record under its true label (members have low loss)."""
    return _log_softmax(z)[np.arange(len(labels)), labels]


def logit_confidence(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log p_y - log(1 - p_y), computed stably from logits: z_y - logsumexp_{j != y} z_j."""
    z = np.asarray(z, dtype=np.float64)
    idx = np.arange(len(labels))
    zy = z[idx, labels]
    other = z.copy()
    other[idx, labels] = -np.inf
    m = other.max(axis=1)
    return zy - (m + np.log(np.exp(other - m[:, None]).sum(axis=1)))


def closest_distances(records: np.ndarray, synthetic: np.ndarray, chunk: int = 512) -> np.ndarray:
    """L2 distance (pixel space, flattened) from each record to its nearest synthetic image."""
    s = torch.as_tensor(synthetic.reshape(len(synthetic), -1), dtype=torch.float64)
    out = []
    for i in range(0, len(records), chunk):  # a `RecordView` of a site's records is read a chunk at a time
        r = as_tensor(records[i:i + chunk], dtype=torch.float64)
        out.append(torch.cdist(r.reshape(len(r), -1), s).min(dim=1).values)
    return torch.cat(out).numpy() if out else np.zeros(0)


def dcr_scores(records: np.ndarray, synthetic: np.ndarray) -> np.ndarray:
    """-log DCR: a record the synthetic set reproduces closely scores high (log makes LiRA's Gaussian fit apt)."""
    return -np.log(closest_distances(records, synthetic) + 1e-8)
