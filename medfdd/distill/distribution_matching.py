"""DP distribution matching (DM: Zhao & Bilen, WACV 2023; private variant as in NDPDC, Zheng & Li 2023).

Per step: a fresh random ConvNet-3 embeds a Poisson sample of augmented real records; their unit-normalised
embeddings are summed per class with a private count and Gaussian noise (`mechanism.noisy_class_stats`); the
synthetic images of each class are moved so their mean embedding matches the noisy real mean. The paid statistic
may drive several synthetic updates (`inner_steps`), which is post-processing and costs no privacy.
"""

from __future__ import annotations

import torch

from medfdd.distill.base import Distiller, DistillState
from medfdd.distill.mechanism import noisy_class_stats, unit_rows

CHUNK = 256


class DistributionMatching(Distiller):
    @torch.no_grad()
    def real_statistic(self, net, x: torch.Tensor, y: torch.Tensor, t: int, center: torch.Tensor | None = None):
        idx = self.poisson_sample(len(x), t).to(x.device)
        g_aug = self.g(t, "augment_real")
        feats = []
        for start in range(0, len(idx), CHUNK):
            xb = self.augment(x[idx[start:start + CHUNK]], g_aug)
            with self.autocast:
                feats.append(net.embed(xb).float())
        f = torch.cat(feats) if feats else torch.zeros(0, net.embed_dim, device=x.device)
        return noisy_class_stats(f, y[idx], self.num_classes, clip_norm=self.plan.clip_norm,
                                 noise_multiplier=self.plan.noise_multiplier, generator=self.g(t, "noise"),
                                 center=center)

    def step(self, state: DistillState, x: torch.Tensor, y: torch.Tensor, t: int) -> float:
        net = self.network(t)
        center = None
        if self.cfg.center:  # the synthetic set's mean feature: no real record involved
            with torch.no_grad():
                center = net.embed(state.images).float().mean(0)
        target, usable = self.real_statistic(net, x, y, t, center).means()
        g_syn = self.g(t, "augment_syn")
        loss_value = 0.0
        for _ in range(self.cfg.inner_steps):
            f = unit_rows(net.embed(self.augment(state.images, g_syn)).float(), center)
            syn_means = torch.zeros(self.num_classes, f.shape[1], device=f.device).index_add(0, state.labels, f)
            syn_means = syn_means / self.cfg.ipc
            loss = ((target - syn_means)[usable] ** 2).sum()
            if not usable.any():
                break
            self.sgd_update(state, loss)
            loss_value = float(loss.detach())
        return loss_value
