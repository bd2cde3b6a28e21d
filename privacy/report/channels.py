"""What a site's epsilon covers, and every data-dependent channel that leaves outside it (shared/DESIGN.md,
invariant 8; issue 36, item 6).

Epsilon is the (epsilon, delta)-DP guarantee of the charged mechanisms (Dwork & Roth 2014, Def. 2.4) under the
site's neighbouring relation (`NEIGHBOURING`, set by `privacy.unit`). Whatever else a site reveals that depends on its
records is listed once, here, as `CHANNELS`: the privacy report (report.json, report.html) and the privacy officer's
guide (docs/privacy-officer.md, `channels_markdown`) are rendered from this list, and tests check they name every
entry. `GROUPS` lists the cases epsilon covers only as a group of records (group privacy: k records are protected
at (k epsilon, k e^((k-1) epsilon) delta); Dwork & Roth 2014, Thm 2.2 and its approximate-DP form).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

HEADING = "## What epsilon covers, and what leaves outside it"
# the codes a failed site task may send (medfdd.federation.failures.FailureCode) and privacy.unit's default
# (medfdd.config.PrivacyConfig), kept equal by tests: privacy/ never imports medfdd.federation
FAILURE_CODES = ("bad-broadcast", "site-not-configured", "site-failed")
DEFAULT_UNIT = "scan"

NEIGHBOURING = {
    "scan": "add or remove one scan (one manifest row and its label)",
    "patient": "add or remove one patient (all of that patient's manifest rows; each training patient contributes "
               "exactly one scan, chosen by a keyed hash of that patient's own rows)",
}

# the round outcomes the coordinator can see that depend on a site's records: an offer, `site-failed`, or silence
DATA_DEPENDENT_OUTCOMES = ("offer", "site-failed", "no answer within site_timeout_s")


@dataclass(frozen=True)
class Channel:
    name: str
    depends_on: str  # what in the site's data it depends on
    size: str  # how much it can reveal, in words
    mitigation: str
    bits_per_round: float | None = None  # a bound per site and round where there is one (None: not a bounded count)


CHANNELS: tuple[Channel, ...] = (
    Channel(
        "audit gate pass/fail",
        "the site's own DCR audit of its synthetic set against its real training and holdout records (no DP), when "
        "`audit_gate` is set",
        "1 bit per round per site (the site offers, or fails as `site-failed`)", "leave `audit_gate` unset for "
        "production sites, or accept the bit; a failing gate leaves as the same `site-failed` code as any other "
        "failure, with its report kept in output/audit_gate.json", 1.0),
    Channel(
        "failure code",
        "whether the site task failed once its config loaded: reading records, distilling (e.g. delta >= 1/n, an "
        "empty training split), the audit gate, taking the final model",
        f"one of {len(FAILURE_CODES)} fixed codes ({', '.join(FAILURE_CODES)}): at most "
        f"log2({len(FAILURE_CODES)}) = {math.log2(len(FAILURE_CODES)):.2f} bits per round per site, of which only "
        "`site-failed` depends on the records (1 bit, shared with the gate's)",
        "the code is chosen by the phase that failed, never by the error (medfdd.federation.failures); class and "
        "message stay in the site's log; run `medfdd site check` before joining so that data faults surface before "
        "a round", math.log2(len(FAILURE_CODES))),
    Channel(
        "whether a site answers",
        "the round's outcome as the coordinator sees it: " + ", ".join(DATA_DEPENDENT_OUTCOMES) + " (silence "
        "follows from the run time, below)",
        f"log2({len(DATA_DEPENDENT_OUTCOMES)}) = {math.log2(len(DATA_DEPENDENT_OUTCOMES)):.2f} bits per round per "
        "site in all (it contains the gate bit and the failure code)",
        "a `site_timeout_s` well above the site's run time, so that a healthy site never falls silent",
        math.log2(len(DATA_DEPENDENT_OUTCOMES))),
    Channel(
        "timing",
        "wall time of the site's turn: loading and checking the manifest (grows with its rows and with preprocess "
        "cache misses), distillation (each paid step embeds a Poisson sample of expected size sample_rate x n, so "
        "with a sample rate fixed in the config the time grows with n; with the paid noisy count it is about "
        "batch_size whatever n), the audit gate (grows with n)",
        "a noisy continuous reading of n and of the manifest size, seen by the coordinator as each site's reply "
        "time (run.json keeps only the round's total); not bounded in bits unless padded (then 1 bit per round: "
        "whether the turn overran the pad)",
        "pad it: `medfdd site join --reply-after S` holds every reply (offer or code) until S seconds after the "
        "task arrived, so its time reveals only whether the turn took longer than S (keep S below the coordinator's "
        "site_timeout_s and above the site's usual turn); in-process runs have one operator and no such channel"),
    Channel(
        "published sample rate",
        "synthetic.json and the ledger publish sample_rate; it is batch_size / n when n is not paid for "
        "(`privacy.count_noise` off and `distill.sample_rate` unset)",
        "n exactly, once (log2 of the largest possible n bits), in that configuration only; none with a paid noisy "
        "count (charged to epsilon) or a sample rate set in the config",
        "pay for a noisy count (`privacy.count_noise`), or set `distill.sample_rate` from public information"),
    Channel(
        "payload size and counts",
        "nothing private: ipc x classes images of the agreed size (the config); images per class under "
        "`allocation: evidence` and `class_evidence` are post-processing of the paid noisy class counts; the "
        "metadata's length follows the released values",
        "0 bits beyond what epsilon covers", "none needed", 0.0),
    Channel(
        "files that stay at the site",
        "quarantine.json, split.json, members.json, audit_gate.json, evaluation.json and the audit report "
        "(report.json, report.html) are computed from real records without DP",
        "0 bits while they stay at the site; shared, each reveals counts (n_members, quarantined rows) and attack "
        "scores exactly: unbounded",
        "keep them at the site; share at most the audit's verdict level (itself a few bits), not the files"),
)

GROUPS: tuple[tuple[str, str], ...] = (
    ("privacy.unit: scan, a patient with k training scans", "that patient is protected as a group of k scans "
     "(`medfdd site check` warns); privacy.unit: patient protects every patient at epsilon"),
    ("the same scan under two patients (or with and without a patient id)", "duplicates are removed only within "
     "one patient, so that one patient's records never depend on another's: each copy is its own record and that "
     "scan is protected as a group of the number of copies (`medfdd site check` names the rows)"),
    ("privacy.unit: scan, a re-encoded second file of one DICOM object (same SOPInstanceUID, other bytes) listed "
     "before the first in the same patient's rows", "it takes the first one's place: a group of 2 for that case"),
    ("data.split: stratified", "epsilon holds for the training set the split produced; one more patient can "
     "reshuffle the others (the default `stable` split keeps neighbouring manifests neighbours)"),
)


def outside_epsilon(units: list[str] | None = None) -> dict:
    """The scope of epsilon and the channels outside it, for report.json (`units`: the runs' `privacy.unit`s)."""
    units = sorted(set(units or NEIGHBOURING))
    return {"neighbouring": {u: NEIGHBOURING[u] for u in units if u in NEIGHBOURING},
            "groups": [{"case": c, "protection": p} for c, p in GROUPS],
            "channels": [asdict(c) for c in CHANNELS],
            "data_dependent_outcomes_bits_per_round": math.log2(len(DATA_DEPENDENT_OUTCOMES))}


def channels_markdown() -> str:
    """The privacy officer's guide section (docs/privacy-officer.md), rendered from the lists above."""
    out = [HEADING, "",
           "Epsilon is the (epsilon, delta) differential-privacy guarantee of what a site releases (synthetic images, "
           "labels, noisy counts), accounted by Opacus in the site's ledger. It is stated for one neighbouring "
           "relation, set by `privacy.unit` (the unit epsilon protects):", ""]
    out += [f"- `privacy.unit: {u}`{' (the default)' if u == DEFAULT_UNIT else ''}: {w}."
            for u, w in NEIGHBOURING.items()]
    out += ["", "Epsilon covers a larger group only at a larger price (k records: k x epsilon, k e^((k-1) epsilon) "
            "delta):", ""]
    out += [f"- {c}: {p}." for c, p in GROUPS]
    out += ["", "What depends on a site's records and leaves outside epsilon (per site; the same list is in every "
            "audit report):", "", "| channel | depends on | size | mitigation |", "|---|---|---|---|"]
    out += [f"| {c.name} | {c.depends_on} | {c.size} | {c.mitigation} |" for c in CHANNELS]
    out += ["", f"Together, the round outcomes that depend on the records ({', '.join(DATA_DEPENDENT_OUTCOMES)}) carry "
            f"at most log2({len(DATA_DEPENDENT_OUTCOMES)}) = {math.log2(len(DATA_DEPENDENT_OUTCOMES)):.2f} bits per "
            "round per site; timing is the one channel without a bound in bits unless the site pads its replies "
            "(`medfdd site join --reply-after`).", ""]
    return "\n".join(out)
