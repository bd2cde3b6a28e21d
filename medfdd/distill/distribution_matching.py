"""DP distribution matching (DM: Zhao & Bilen, WACV 2023; private variant as in NDPDC, Zheng & Li 2023).

A paid step t: a fresh random ConvNet-3 (seeded by t) embeds a Poisson sample of augmented real records; their
unit-normalised embeddings are summed per class with a private count and Gaussian noise
(`mechanism.noisy_class_stats`). The synthetic images of each class move so that their mean embedding matches the
noisy real mean. Everything after the release of a noisy statistic is post-processing and costs no privacy.

Two schedules (`distill.schedule`):
- `decoupled` (default; the decoupled optimisation and sampling of Dosser, Zheng et al. 2025): all `iterations`
  noisy statistics are paid for first and kept in a bank (per class sums and counts; the network is rebuilt from its
  seed). Then `iterations x inner_steps` synthetic updates each draw one banked statistic at random, so every
  update meets a different network instead of chasing one statistic's noise for several updates in a row. Class
  counts are pooled over the whole bank (their expectation q * n_class is the same every step), so the count
  coordinate needs only a small share of C^2 and the features keep the rest. The released images are a moving
  average of the iterates (`distill.ema`), which averages the noise the updates follow.
- `interleaved`: `inner_steps` updates right after each paid statistic, each statistic normalised by its own count.

Under `privacy.noise_source: secure` the noise cannot be replayed: an interleaved run, and a decoupled run still
paying its bank, resume soundly (what they kept was produced only by statistics drawn once; the rest are drawn
afresh). A decoupled run keeps its paid bank in the site-local `secure_store` (one safetensors file, tagged with the
release) and resumes its updates from it; without that file it is refused (`SecureNoiseReplay`): its images follow
that bank, and a new bank would be a second release.

`allocation: evidence` (decoupled only): once the bank is paid, the ipc x classes images are shared among the
classes by the released class evidence before the first update, so a site spends its images on the classes whose
noisy means are precise (noise on a class mean scales like 1 / its records) instead of on classes it hardly has.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from medfdd.augment import apply_family, choose_family
from medfdd.distill.base import Distiller, DistillState, evidence_allocation, synthetic_labels
from medfdd.distill.mechanism import COUNT_SHARE, noisy_class_stats, secure_replay_refused, unit_rows
from medfdd.io import atomic_write_bytes
from medfdd.nets import Classifier, model_chunk
from medfdd.nets.stacked import stack_networks

POOLED_COUNT_SHARE = 0.1  # decoupled: the count coordinate's share of C^2 (counts are averaged over the bank)


@dataclass(frozen=True)
class MatchTarget:
    """What one synthetic update matches under one network: the target class means (of one paid statistic), the
    classes they are usable for, the centre and augmentation family of that statistic (None: DSA draws one)."""

    net: Classifier
    mean: torch.Tensor
    usable: torch.Tensor
    center: torch.Tensor | None
    family: str | None


@dataclass
class SignalBank:
    """The paid noisy statistics of a decoupled run: one row per paid step."""

    sums: list[torch.Tensor]  # P x [K, d] noisy per-class sums of features scaled to `feature_scale` (d may differ
    # between steps: in FedDM rounds every other network is the broadcast global model)
    pooled_counts: torch.Tensor  # [K] the noisy per-class counts averaged over all steps (~ q * n_class)
    centers: list[torch.Tensor | None]  # the data-independent centre each step used
    families: list[str | None]  # the augmentation family of each step
    feature_scale: float

    def target(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean feature per class of statistic s, classes with a usable pooled count): the sum over the pooled
        expected count, both released values, so this is post-processing."""
        usable = self.pooled_counts >= 1.0
        return self.sums[s] / (self.feature_scale * self.pooled_counts.clamp(min=1.0)).unsqueeze(1), usable

    def save(self, path: Path, tag: str) -> None:
        """Keep the bank at the site (safetensors, atomically), tagged with the release it belongs to."""
        tensors = {"pooled_counts": self.pooled_counts.cpu().contiguous()}
        tensors.update({f"sums.{s}": v.cpu().contiguous() for s, v in enumerate(self.sums)})
        tensors.update({f"centers.{s}": c.cpu().contiguous() for s, c in enumerate(self.centers) if c is not None})
        meta = {"tag": tag, "steps": str(len(self.sums)), "families": json.dumps(self.families),
                "feature_scale": repr(self.feature_scale)}
        atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: Path, tag: str, steps: int, device: torch.device) -> SignalBank | None:
        """The bank kept at `path` for release `tag` with `steps` statistics, or None (missing, unreadable, other)."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("tag") != tag or meta.get("steps") != str(steps):
                    return None
                t = {k: f.get_tensor(k).to(device) for k in f.keys()}
            return cls([t[f"sums.{s}"] for s in range(steps)], t["pooled_counts"],
                       [t.get(f"centers.{s}") for s in range(steps)], json.loads(meta["families"]),
                       float(meta["feature_scale"]))
        except Exception:
            return None


class DistributionMatching(Distiller):
    @property
    def decoupled(self) -> bool:
        return self.cfg.schedule == "decoupled"

    @property
    def updates(self) -> int:
        """Synthetic updates of a decoupled run: iterations x inner_steps network evaluations, `networks_per_update`
        of them in each update."""
        return math.ceil(self.plan.steps * self.cfg.updates_per_statistic / self.cfg.networks_per_update)

    @property
    def total_work(self) -> int:
        return self.plan.steps + self.updates if self.decoupled else self.plan.steps

    def center(self, net, images: torch.Tensor) -> torch.Tensor | None:
        """The synthetic set's mean feature (no real record involved), or None when centring is off."""
        if not self.cfg.center:
            return None
        chunk = model_chunk(net, self.image_shape)
        with torch.no_grad():
            return torch.cat([net.embed(images[s:s + chunk]).float() for s in range(0, len(images), chunk)]).mean(0)

    def real_statistic(self, net, x: torch.Tensor, y: torch.Tensor, t: int, center: torch.Tensor | None = None,
                       family: str | None = None, count_share: float = COUNT_SHARE):
        """The Gaussian mechanism on the per-class sums of step t (`real_statistics` for one step)."""
        return self.real_statistics([net], x, y, [t], [center], [family], count_share)[0]

    @torch.no_grad()
    def real_statistics(self, nets: Sequence[Classifier], x: torch.Tensor, y: torch.Tensor, steps: Sequence[int],
                        centers: Sequence[torch.Tensor | None], families: Sequence[str | None],
                        count_share: float = COUNT_SHARE) -> list:
        """The Gaussian mechanism on the per-class sums of each step t of `steps`: a Poisson sample under one
        augmentation family (drawn for the step when None, as DSA draws one per batch) with independent per-record
        parameters, embedded by the step's network. One family for the whole sample, never one per chunk: a record's
        chunk depends on how many records precede it, so per-chunk families would let one added record change the
        augmentation of others, and the sum could move by more than the clip norm the noise is calibrated to.
        The steps' networks are evaluated together (`stack_networks`), each on its own sample padded with zero rows
        to the longest; a record's features depend on that record alone (per-record instance norm, per-group
        convolutions), and padded rows are dropped before anything is summed. Each step keeps its own streams, so a
        step's release does not depend on which steps it was evaluated with (up to float rounding)."""
        samples, augs, fams = [], [], []
        for t, family in zip(steps, families, strict=True):
            samples.append(self.poisson_sample(len(x), t).to(x.device))
            augs.append(self.g(t, "augment_real"))
            fams.append(choose_family(augs[-1], self.families) if family is None else family)
        chunk = model_chunk(nets[0], self.image_shape)  # augmentation chunks as for one network: the same draws
        groups = stack_networks(nets)
        feats: list[list[torch.Tensor]] = [[] for _ in steps]
        for start in range(0, max(len(idx) for idx in samples), chunk):
            xb = [apply_family(x[idx[start:start + chunk]], g, fam) if len(idx) > start else x[:0]
                  for idx, g, fam in zip(samples, augs, fams, strict=True)]
            for net, members in groups:
                rows = max(len(xb[i]) for i in members)
                if rows == 0:
                    continue
                padded = torch.stack([torch.cat([xb[i], xb[i].new_zeros((rows - len(xb[i]), *xb[i].shape[1:]))])
                                      for i in members])
                sub = min(chunk, model_chunk(net, self.image_shape))  # peak memory follows the record size
                with self.autocast:
                    out = torch.cat([net.embed(padded[:, s:s + sub]) for s in range(0, rows, sub)], dim=1).float()
                for k, i in enumerate(members):
                    feats[i].append(out[k, :len(xb[i])])
        results = []
        for i, (t, idx) in enumerate(zip(steps, samples, strict=True)):
            f = torch.cat(feats[i]) if feats[i] else torch.zeros(0, nets[i].embed_dim, device=x.device)
            results.append(noisy_class_stats(f, y[idx], self.num_classes, clip_norm=self.plan.clip_norm,
                                             noise_multiplier=self.plan.noise_multiplier,
                                             generator=self.mechanism_rng(t, "noise"), center=centers[i],
                                             count_share=count_share))
        return results

    def match(self, state: DistillState, targets: Sequence[MatchTarget], g: torch.Generator) -> float:
        """One synthetic update: for each target, the squared distance between the class means of the augmented
        synthetic features under its network and its target means, over its usable classes, each weighted by its
        images / ipc (`family` None: one family drawn from `g`, as DSA does); the mean over the targets, whose
        networks are evaluated together (`stack_networks`: one grouped network for G random ConvNet-3s)."""
        per_class = torch.bincount(state.labels, minlength=self.num_classes)
        usable = [t.usable & (per_class > 0) for t in targets]
        if not any(u.any() for u in usable):
            return 0.0
        xs = [self.augment(state.images, g) if t.family is None else apply_family(state.images, g, t.family)
              for t in targets]

        def matching_loss(features: list[torch.Tensor]) -> torch.Tensor:
            total = 0.0
            for t, use, f in zip(targets, usable, features, strict=True):
                f = unit_rows(f.float(), t.center)
                syn_sums = torch.zeros(self.num_classes, f.shape[1], device=f.device).index_add(0, state.labels, f)
                gap = ((t.mean - syn_sums / per_class.clamp(min=1).unsqueeze(1)) ** 2).sum(1)
                total = total + (gap * per_class / self.cfg.ipc)[use].sum()  # weight n_c / ipc: every image moves
                # as fast as with ipc images in its class (1 under uniform allocation), however many it was allocated
            return total / len(targets)

        groups = [(net, idx, torch.stack([xs[i] for i in idx])) for net, idx in stack_networks([t.net for t in targets])]
        chunks = [model_chunk(net, self.image_shape, backward=True) for net, _, _ in groups]
        if all(len(state.images) <= c for c in chunks):
            loss = matching_loss(self._ordered(groups, [net.embed(x) for net, _, x in groups], len(targets)))
            self.sgd_update(state, loss)
            return float(loss.detach())
        # too large to embed with a graph at once (volumes): features without one, the loss's gradient with respect
        # to them, then each chunk embedded again with its graph and back-propagated (the same gradient, twice the
        # forward work, the memory of one chunk)
        with torch.no_grad():
            feats = [torch.cat([net.embed(x[:, s:s + c]) for s in range(0, x.shape[1], c)], dim=1)
                     for (net, _, x), c in zip(groups, chunks, strict=True)]
        for f in feats:
            f.requires_grad_(True)
        loss = matching_loss(self._ordered(groups, feats, len(targets)))
        g_feats = torch.autograd.grad(loss, feats)
        leaves = []
        for (net, _, x), c, gf, f in zip(groups, chunks, g_feats, feats, strict=True):
            leaf = x.detach().requires_grad_(True)
            for s in range(0, x.shape[1], c):
                net.embed(leaf[:, s:s + c]).backward(gf[:, s:s + c].to(f.dtype))
            leaves.append(leaf.grad)
        (grad,) = torch.autograd.grad([x for _, _, x in groups], state.images, grad_outputs=leaves)
        self.sgd_step(state, grad)
        return float(loss.detach())

    @staticmethod
    def _ordered(groups, features: list[torch.Tensor], n: int) -> list[torch.Tensor]:
        """Each target's [B, d] features, in target order, from the groups' [G_j, B, d] outputs."""
        out: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        for (_, idx, _), f in zip(groups, features, strict=True):
            for k, i in enumerate(idx):
                out[i] = f[k]
        return out

    # ------------------------------------------------------------------ interleaved

    def step(self, state: DistillState, x: torch.Tensor, y: torch.Tensor, t: int) -> float:
        net = self.network(t)
        center = self.center(net, state.images)
        stats = self.real_statistic(net, x, y, t, center)
        state.add_counts(stats.counts)
        target, usable = stats.means()
        g_syn = self.g(t, "augment_syn")
        loss = 0.0
        for _ in range(self.cfg.updates_per_statistic):
            loss = self.match(state, [MatchTarget(net, target, usable, center, None)], g_syn)
        return loss

    # ------------------------------------------------------------------ decoupled

    def bank(self, x: torch.Tensor, y: torch.Tensor, init_images: torch.Tensor,
             on_paid: Callable[[int], None] | None = None) -> SignalBank:
        """Pay every planned noisy statistic (the noise of step t is seeded by t: a resumed run recomputes exactly
        the same releases; under secure noise it draws a new bank, which is sound only while no update has used the
        old one, see `run`). Centres come from the initial synthetic images, which hold no real data."""
        sums, counts, centers, families = [], [], [], []
        feature_scale = 0.0
        together = self.cfg.networks_per_update
        for first in range(0, self.plan.steps, together):  # that many networks evaluated at once
            steps = range(first, min(first + together, self.plan.steps))
            nets = [self.network(t) for t in steps]
            group_centers = [self.center(net, init_images) for net in nets]
            group_families = [choose_family(self.g(t, "augment_syn"), self.families) for t in steps]
            paid = self.real_statistics(nets, x, y, steps, group_centers, group_families,
                                        count_share=POOLED_COUNT_SHARE)
            for t, stats, center, family in zip(steps, paid, group_centers, group_families, strict=True):
                sums.append(stats.sums)
                counts.append(stats.counts)
                centers.append(center)
                families.append(family)
                feature_scale = stats.feature_scale
                if on_paid:
                    on_paid(t)
        return SignalBank(sums, torch.stack(counts).mean(0), centers, families, feature_scale)

    def allocate(self, state: DistillState) -> None:
        """`allocation: evidence`, before the first update: share the ipc x classes images by the released class
        evidence (`base.evidence_allocation`, post-processing). From noise the images are only relabelled; a warm
        start keeps up to the new count of each class's previous images and fills the other slots with noise."""
        counts = evidence_allocation(self.class_evidence(state), self.plan.sample_rate,
                                     self.num_classes * self.cfg.ipc)
        labels = synthetic_labels(self.num_classes, counts).to(self.device)
        images = self.noise_images()
        if self.start is not None:
            for k, m in enumerate(counts):
                previous = state.images.detach()[state.labels == k][:m]
                images[(labels == k).nonzero().squeeze(1)[:len(previous)]] = previous
        state.images, state.labels = images.requires_grad_(True), labels
        state.momentum = torch.zeros_like(images)

    def update_average(self, state: DistillState, u: int) -> None:
        """Moving average of the iterates with warm-up (decay min(ema, (1 + u) / (10 + u))), so short runs are not
        dominated by the noise initialisation."""
        if self.cfg.ema <= 0:
            return
        decay = min(self.cfg.ema, (1 + u) / (10 + u))
        with torch.no_grad():
            if state.average is None:
                state.average = state.images.detach().clone()
            else:
                state.average.mul_(decay).add_(state.images.detach(), alpha=1 - decay)

    def run(self, x: torch.Tensor, y: torch.Tensor, state: DistillState | None = None,
            on_step: Callable[[DistillState, float], None] | None = None) -> DistillState:
        if not self.decoupled:
            return super().run(x, y, state, on_step)
        state = state or self.init_state()
        steps = self.plan.steps
        kept = None
        if self.secure and state.iteration > steps:  # the images already follow a bank that cannot be redrawn
            kept = self.secure_store and SignalBank.load(*self.secure_store, steps, self.device)
            if kept is None:
                raise secure_replay_refused(f"round {self.round}, update {state.iteration - steps} of {self.updates}",
                                            "this decoupled run was interrupted after its bank of noisy statistics "
                                            "was paid and used, and that bank is not kept at the site")
        x, y = x.to(self.device), y.to(self.device)

        def on_paid(t: int) -> None:
            if t >= state.iteration:  # a resumed run recomputes earlier statistics silently
                state.iteration = t + 1
                if on_step:
                    on_step(state, float("nan"))

        bank = kept if kept is not None else self.bank(x, y, self.init_state().images.detach(), on_paid)
        if self.secure and kept is None and self.secure_store is not None:
            bank.save(*self.secure_store)
        state.counts_sum = bank.pooled_counts * steps
        if self.cfg.allocation == "evidence" and state.iteration <= steps:  # no update made yet (resume-safe)
            self.allocate(state)
        g_net = self.cfg.networks_per_update
        for u in range(max(0, state.iteration - steps), self.updates):
            picks = torch.randint(0, steps, (g_net,), generator=self.g(u, "pick")).tolist()
            loss = self.match(state, [MatchTarget(self.network(s), *bank.target(s), bank.centers[s], bank.families[s])
                                      for s in picks], self.g(u, "augment_syn"))
            self.update_average(state, u)
            state.iteration = steps + u + 1
            state.losses.append((u + 1, loss))
            if on_step:
                on_step(state, loss)
        return state
