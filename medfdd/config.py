"""Typed, validated configs (pydantic v2, unknown keys are errors) for sites and the coordinator.

Relative paths in a config file are resolved against the directory holding that file.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medfdd.errors import ConfigError

SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
AttackName = Literal["loss", "lira_online", "lira_offline", "dcr", "canary"]  # privacy.audit's attacks
# The recommended plan (docs/benchmarks.md): about 100 paid DP steps per site, over 3 federated rounds.
DEFAULT_ROUNDS = 3
DEFAULT_PAID_STEPS = 100
# hybrid mode's recommended plan (docs/benchmarks.md#hybrid-mode): the distillation keeps epsilon 1 of a site's budget,
# 20 DP-FedAvg rounds fine-tune a width-32 global model with the rest
HYBRID_DISTILL_EPSILON = 1.0
HYBRID_FINETUNE_ROUNDS = 20
HYBRID_GLOBAL_WIDTH = 32


MODES = ("auto", "one-shot", "hybrid")  # `medfdd prepare --mode`
# where hybrid mode led the one-shot mode and tuned DP-FedAvg (docs/benchmarks.md#hybrid-mode): epsilon 4 and 10 per
# site on mildly non-IID sites (Dirichlet alpha 0.5) of several thousand training records each
HYBRID_MIN_EPSILON = 4.0
HYBRID_MIN_ALPHA = 0.5
HYBRID_MIN_SITE_RECORDS = 5000


def recommended_mode(*, epsilon: float, alpha: float, dp: bool, site_records: list[int]) -> str:
    """`hybrid` in the regime where it was measured ahead (epsilon, Dirichlet alpha and every site's training
    records at least the HYBRID_MIN_* above), else `one-shot`."""
    if dp and epsilon >= HYBRID_MIN_EPSILON and alpha >= HYBRID_MIN_ALPHA and min(site_records) >= \
            HYBRID_MIN_SITE_RECORDS:
        return "hybrid"
    return "one-shot"


def hybrid_finetune_share(epsilon: float) -> float:
    """The recommended `privacy.finetune_share` of a hybrid site with budget `epsilon`: all but
    `HYBRID_DISTILL_EPSILON` for the fine-tuning; half at epsilon <= 2, where hybrid mode is not recommended (the
    distillation alone did better there)."""
    if epsilon <= 2 * HYBRID_DISTILL_EPSILON:
        return 0.5
    return round(1 - HYBRID_DISTILL_EPSILON / epsilon, 6)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MinMax(_Strict):
    """Scale each image to [0, 1] by its own minimum and maximum."""

    mode: Literal["minmax"] = "minmax"


class Percentile(_Strict):
    """Clip each image to its [lower, upper] percentiles, then scale to [0, 1] (robust to hot pixels)."""

    mode: Literal["percentile"]
    lower: float = Field(0.5, ge=0, lt=100)
    upper: float = Field(99.5, gt=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> Percentile:
        if self.lower >= self.upper:
            raise ValueError(f"lower ({self.lower}) must be below upper ({self.upper})")
        return self


class CTWindow(_Strict):
    """Window in Hounsfield units (after DICOM RescaleSlope/Intercept): [center - width/2, center + width/2] -> [0, 1]."""

    mode: Literal["ct_window"]
    center: float
    width: float = Field(gt=0)


Intensity = Annotated[MinMax | Percentile | CTWindow, Field(discriminator="mode")]


def axis_codes(v: str) -> str:
    """3 axis codes (one of L/R, A/P and S/I each), upper-cased; ValueError otherwise."""
    v = v.upper()
    pairs = [{c for c in v if c in pair} for pair in ("LR", "AP", "SI")]
    if len(v) != 3 or any(len(p) != 1 for p in pairs):
        raise ValueError(f"{v!r} is not 3 axis codes, one of L/R, one of A/P and one of S/I each (e.g. RAS, LPS)")
    return v


class DataConfig(_Strict):
    root: Path = Field(description="folder holding the scans, relative to the config file")
    manifest: str = Field("labels.csv", description="CSV under root with columns path,label[,patient_id]")
    format: Literal["auto", "dicom", "nifti", "png"] = Field(
        "auto", description="`auto` (by suffix / DICOM magic) | `dicom` | `nifti` | `png`")
    classes: list[str] = Field(min_length=2, description="consortium-wide class names, in index order")
    spatial_size: list[int] = Field(min_length=2, max_length=3, description="[H, W] or [D, H, W] after resizing")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale (RGB is converted), 3 = RGB (grayscale is repeated)")
    intensity: Intensity = Field(default_factory=MinMax, description="`minmax` | `{mode: percentile, lower, upper}` | "
                                 "`{mode: ct_window, center, width}` (HU, after RescaleSlope/Intercept)")
    holdout_fraction: float = Field(0.2, ge=0, lt=1, description="kept at the site for audits, split by patient_id")
    split: Literal["stable", "stratified"] = Field(
        "stable", description="`stable`: each patient's side is a keyed hash of its own id (adding patients never "
        "moves another; epsilon covers every patient in the manifest) | `stratified`: exact per-class fractions, "
        "reshuffled when patients are added")
    cache: bool = Field(True, description="cache preprocessed tensors under output/cache (invalidated on any change)")
    cache_dir: Path | None = Field(None, description="folder of that cache instead, relative to the config file: "
                                   "entries are keyed by the scan's bytes and the preprocessing settings, so runs "
                                   "with other output folders can share one without re-decoding every scan")
    max_voxels: int = Field(2**27, ge=1, description="refuse images whose header announces more voxels than this")
    orientation: str = Field(
        "RAS", description="axis codes every NIfTI image with a set sform/qform and every DICOM series with patient "
        "geometry is reoriented to (MONAI `Orientation`), so the same anatomy loads to one array whatever its "
        "affine; single-file DICOM and PNG keep their stored rows x columns")
    spacing: list[float] | None = Field(
        None, min_length=3, max_length=3, description="voxel size in mm along the `orientation` axes to resample "
        "reoriented 3D volumes to (MONAI `Spacing`) before resizing; null: no resampling")
    fit: Literal["resize", "crop_or_pad"] = Field(
        "resize", description="how a scan reaches spatial_size: `resize` (interpolated; the voxel size then differs "
        "from scan to scan) | `crop_or_pad` (centre crop or zero pad, MONAI `ResizeWithPadOrCrop`: with data.spacing "
        "every voxel is exactly that size, and the synthetic NIfTI says so)")

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, v: str) -> str:
        return axis_codes(v)

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(not (0 < s < math.inf) for s in v):
            raise ValueError(f"every voxel size must be a positive number of mm, got {v}")
        return v

    @model_validator(mode="after")
    def _spacing_is_3d(self) -> DataConfig:
        if self.spacing is not None and len(self.spatial_size) != 3:
            raise ValueError("data.spacing resamples 3D volumes: set it only with a 3-entry spatial_size [D, H, W]")
        return self

    @property
    def voxel_size(self) -> list[float] | None:
        """Every preprocessed voxel's size in mm along the `orientation` axes when it is fixed (`spacing` with
        `fit: crop_or_pad`); None when resizing makes it differ from scan to scan."""
        return list(self.spacing) if self.spacing is not None and self.fit == "crop_or_pad" else None

    @field_validator("spatial_size")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(s < 1 or s > 4096 for s in v):
            raise ValueError(f"every size must be in [1, 4096], got {v}")
        return v

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({c for c in v if v.count(c) > 1})
        if dup:
            raise ValueError(f"class names must be unique, repeated: {dup}")
        if any(not c.strip() for c in v):
            raise ValueError("class names must not be empty")
        return v


PrivacyUnit = Literal["scan", "patient"]  # privacy.accounting.PRIVACY_UNITS


class PrivacyConfig(_Strict):
    dp: bool = Field(True, description="false only for baselines and positive controls (recorded as epsilon = inf)")
    epsilon: float = Field(1.0, gt=0, description="the site's total budget over all rounds")
    delta: float = Field(1e-5, gt=0, lt=1, description="must be below 1/n (n = the site's training records)")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="`rdp` (Rényi DP) or `prv` (privacy random "
                                                                "variables), both Opacus's")
    rounds: int = Field(DEFAULT_ROUNDS, ge=1, description="planned federated rounds; the budget is split across "
                        "them (the coordinator's `rounds` may not exceed it)")
    count_noise: float | None = Field(
        20.0, gt=0, description="std (in records) of Gaussian noise on the training-record count from which the "
        "default sample rate batch_size / n~ is derived, paid once from the budget (so the published sample rate "
        "discloses only this DP estimate n~); null: n is declared public and the published sample rate discloses it "
        "(unused when distill.sample_rate is set)")
    unit: PrivacyUnit = Field(
        "scan", description="what epsilon protects: `scan` (each scan; a patient with k training scans is protected "
        "only as a group of k) or `patient` (each training patient contributes one scan, chosen by a hash of the "
        "patient's own rows; needs a patient_id on every manifest row, rows without one are quarantined)")
    noise_source: Literal["keyed", "secure"] = Field(
        "keyed", description="where the Gaussian noise and the Poisson samples come from: `keyed` (float64 draws "
        "from torch generators keyed by the site's secret noise key: a resumed or repeated round replays them "
        "exactly) or `secure` (53-bit uniforms from the operating system's CSPRNG, never reproducible: an interrupted "
        "round resumes only from its checkpoint, and a finished round is never run again)")

    finetune_share: float = Field(
        0.0, ge=0, lt=1, description="hybrid mode: fraction of epsilon kept for DP fine-tuning after the "
        "distillation rounds (the distillation calibrates to (1 - share) x epsilon; the fine-tuning rounds to what "
        "is left of epsilon given every earlier charge); 0 = off")
    finetune_rounds: int = Field(0, ge=0, description="hybrid mode: planned DP fine-tuning rounds (the coordinator's "
                                 "`finetune.rounds`); a round beyond them is refused")

    @field_validator("epsilon")
    @classmethod
    def _finite(cls, v: float) -> float:
        if math.isnan(v):
            raise ValueError("epsilon must be a number")
        return v

    @model_validator(mode="after")
    def _finetune_plan(self) -> PrivacyConfig:
        if (self.finetune_share > 0) != (self.finetune_rounds > 0):
            raise ValueError("privacy.finetune_share and privacy.finetune_rounds go together: set both (hybrid "
                             "mode) or neither")
        if self.finetune_rounds > 0 and self.noise_source == "secure":
            raise ValueError("privacy.noise_source: secure does not cover DP fine-tuning yet (its noise is keyed): "
                             "use noise_source: keyed with hybrid mode, or turn hybrid mode off")
        return self


class DistillConfig(_Strict):
    method: Literal["dm", "gm"] = Field("dm", description="dm = distribution matching, gm = gradient matching")
    ipc: int = Field(10, ge=1, le=1000, description="synthetic images per class")
    iterations: int = Field(math.ceil(DEFAULT_PAID_STEPS / DEFAULT_ROUNDS), ge=1, description="DP steps per round "
                            "(each pays for one noisy statistic); the default, over the default 3 planned rounds, "
                            "pays about 100 statistics")
    batch_size: int | None = Field(None, ge=1, description="expected real records per step (Poisson sampling); "
                                   "default `batch_per_class` x the number of classes")
    batch_per_class: int = Field(128, ge=1, description="expected real records per class per step when "
                                 "`batch_size` is unset (a site with fewer records samples them all, q = 1)")
    sample_rate: float | None = Field(None, gt=0, le=1, description="Poisson sampling probability fixed in advance "
                                      "(`batch_size` is then unused); default expected batch / n~, with n~ the "
                                      "site's DP record count (privacy.count_noise)")
    clip_norm: float = Field(1.0, gt=0, description="L2 bound C on one record's contribution")
    inner_steps: int | None = Field(None, ge=1, description="synthetic updates per paid noisy statistic "
                                    "(post-processing); default 20 for dm decoupled, else 1")
    schedule: Literal["decoupled", "interleaved"] = Field(
        "decoupled", description="dm: `decoupled` pays every noisy statistic first, then makes iterations x "
        "inner_steps updates, each on a statistic drawn at random; `interleaved` updates right after each one")
    ema: float = Field(0.99, ge=0, lt=1, description="dm decoupled: release a moving average of the images over the "
                       "updates with this decay (0 = the last iterate)")
    networks_per_update: int = Field(1, ge=1, le=64, description="dm decoupled: random matching networks evaluated "
                                     "together as one grouped network: this many paid steps at a time in the bank "
                                     "(the same releases), and this many banked statistics matched in each synthetic "
                                     "update, so the run makes iterations x inner_steps / this many updates and "
                                     "evaluates as many networks as with 1 (fewer, larger launches on a GPU; the same "
                                     "arithmetic on a CPU)")
    lr: float = Field(30.0, gt=0, description="learning rate of the synthetic images (SGD, momentum 0.5)")
    center: bool = Field(True, description="centre features on the synthetic mean before normalising")
    augment: bool = Field(True, description="differentiable augmentation (DSA) on real and synthetic images")
    flip: bool = Field(False, description="allow horizontal flips in augmentation (off: laterality matters)")
    width: int = Field(128, ge=1, description="channels of the ConvNet-3 matching network")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast for the real data on CUDA and on CPUs with native bf16 "
        "(AVX512-BF16, AMX), else fp32 (bf16 was 10x slower on an AVX2-only CPU); fp32 / bf16 force one")
    checkpoint_every: int = Field(50, ge=1, description="iterations between resumable checkpoints")
    warm_start: bool = Field(True, description="rounds >= 2: start from this site's own previous-round release "
                             "(DP output, so free) instead of noise")
    allocation: Literal["uniform", "evidence"] = Field(
        "evidence", description="images per class: `uniform` = ipc each; `evidence` (dm decoupled; the default "
        "there, else uniform) shares the same ipc x classes images in proportion to the released noisy class counts "
        "(post-processing), so a class this site hardly has gets few or none: better for sites with hundreds of "
        "records per class, worse for tiny ones")

    @model_validator(mode="before")
    @classmethod
    def _allocation_default(cls, data: Any) -> Any:
        """Evidence allocation needs the noisy class counts first: unset, it falls back to uniform where they are not."""
        if isinstance(data, dict) and "allocation" not in data and (
                data.get("method", "dm") != "dm" or data.get("schedule", "decoupled") != "decoupled"):
            return {**data, "allocation": "uniform"}
        return data

    @model_validator(mode="after")
    def _allocation_needs_bank(self) -> DistillConfig:
        if self.allocation == "evidence" and (self.method != "dm" or self.schedule != "decoupled"):
            raise ValueError("distill.allocation: `evidence` needs the noisy class counts before the first update, "
                             "i.e. method dm with schedule decoupled; use allocation uniform otherwise")
        if self.networks_per_update > 1 and (self.method != "dm" or self.schedule != "decoupled"):
            raise ValueError("distill.networks_per_update > 1 matches several banked statistics per update, i.e. "
                             "method dm with schedule decoupled; set it to 1 otherwise")
        return self

    @property
    def updates_per_statistic(self) -> int:
        if self.inner_steps is not None:
            return self.inner_steps
        return 20 if self.method == "dm" and self.schedule == "decoupled" else 1

    def expected_batch(self, num_classes: int) -> int:
        """Expected real records per step: `batch_size`, else `batch_per_class` per class."""
        return self.batch_size if self.batch_size is not None else self.batch_per_class * num_classes

    def sample_rate_for(self, n_records: int, num_classes: int) -> float:
        """Poisson sampling probability: `sample_rate` when fixed, else the expected batch / n (at most 1)."""
        return self.sample_rate or min(1.0, self.expected_batch(num_classes) / max(1, n_records))


class AuditGate(_Strict):
    """Audit thresholds a site requires before its synthetic set is offered (`privacy.audit.gate.check_gate`)."""

    max_auc: float = Field(0.6, gt=0, le=1, description="largest membership-inference AUC allowed")
    auc_significance: float | None = Field(None, gt=0, lt=1, description="when set, an AUC above max_auc fails "
                                           "only if it is also significant: its p-value (the chance that scores "
                                           "carrying no membership, compared patient by patient, reach that AUC) is "
                                           "below this, e.g. 0.05; unset: every AUC above max_auc fails, which a "
                                           "small site can do by chance")
    max_tpr_at_fpr_0_001: float | None = Field(None, ge=0, le=1, description="largest TPR at 0.1 % FPR allowed")
    max_tpr_at_fpr_0_01: float | None = Field(0.05, ge=0, le=1, description="largest TPR at 1 % FPR allowed")
    max_epsilon_lower_bound: float | None = Field(None, ge=0, description="largest empirical epsilon bound allowed")
    bound_within_accounted: bool = Field(True, description="fail if an empirical bound exceeds the accounted epsilon")
    attacks: list[AttackName] | None = Field(None, min_length=1, description="attacks that count: loss | "
                                             "lira_online | lira_offline | dcr | canary (default: all in the report)")


class SiteEvaluateConfig(_Strict):
    """`site evaluate`: the site's own models next to the global one, both trained on its training patients only
    (they and their scores never leave the site; the audit holdout is only scored) with one fixed recipe at the global
    model's width, chosen without any holdout: a fine-tuning learning rate (below the from-scratch 0.01, as in
    transfer learning, Yosinski et al. 2014) measured on small digits sites (benchmarks/site_finetune.py)."""

    finetune: bool = Field(True, description="also fine-tune the global model on this site's training scans "
                           "(kept as output/fine_tuned_model.safetensors) and train a local-only model from scratch "
                           "with the same recipe, and score all three")
    epochs: int = Field(100, ge=1, description="training epochs of both site models (learning rate divided by 10 at "
                        "half of them)")
    lr: float = Field(0.003, gt=0, description="SGD learning rate of both site models (momentum 0.9)")
    batch_size: int = Field(64, ge=1, description="training batch size of both site models")
    augment: bool = Field(True, description="differentiable augmentation (DSA) while training them")


class SiteConfig(_Strict):
    site_id: str = Field(pattern=SITE_ID_PATTERN, description="your site's name in the consortium (letters, digits, "
                                                            "`_.-`)")
    data: DataConfig
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    output: Path = Field(description="where artifacts go, relative to the config file")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` (CUDA if present) | `cpu` | `cuda`")
    workers: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto", description="processes decoding the scans: `auto` = this machine's cores (one per 2,000 manifest rows, "
        "so a small site decodes in-process) | a number (1 = in-process); the result is the same for any number")
    seed: int = Field(0, ge=0, description="seeds the split, and the distillation together with the site's secret "
                      "`output/noise_key` (created on the first run)")
    audit_gate: AuditGate | None = Field(None, description="optional: audit thresholds to pass before offering")
    evaluate: SiteEvaluateConfig = Field(default_factory=SiteEvaluateConfig)
    base_dir: Path = Field(Path("."), exclude=True, description="directory of the config file (set by the loader)")
    source: Path | None = Field(None, exclude=True, description="the config file itself (set by the loader)")

    @field_validator("audit_gate")
    @classmethod
    def _gate_attacks_run_here(cls, gate: AuditGate | None) -> AuditGate | None:
        """The offer-path gate scores DCR only: a gate naming other attacks would fail every round for want of rows."""
        if gate is not None and gate.attacks is not None and "dcr" not in gate.attacks:
            raise ValueError(f"attacks {gate.attacks} leave nothing to check: the gate on the offer path runs the "
                             "dcr attack only; add dcr or drop audit_gate.attacks")
        return gate

    @property
    def data_root(self) -> Path:
        return (self.base_dir / self.data.root).resolve()

    @property
    def output_dir(self) -> Path:
        return (self.base_dir / self.output).resolve()

    @property
    def cache_folder(self) -> Path:
        """Where the preprocessing cache lives: `data.cache_dir`, else output/cache/preprocessed."""
        if self.data.cache_dir is not None:
            return (self.base_dir / self.data.cache_dir).resolve()
        return self.output_dir / "cache" / "preprocessed"


class TestSetConfig(_Strict):
    root: Path = Field(description="the coordinator's labelled test scans, relative to the config file")
    manifest: str = Field("labels.csv", description="CSV under root, same columns as a site's")
    format: Literal["auto", "dicom", "nifti", "png"] = Field("auto", description="as `data.format` of a site")
    intensity: Intensity | None = Field(None, description="as `data.intensity` of the sites (default: the setting "
                                        "all in-process site configs share; `minmax` when there are none)")
    orientation: str = Field("RAS", description="as `data.orientation` of the sites")
    spacing: list[float] | None = Field(None, min_length=3, max_length=3, description="as `data.spacing` of the "
                                        "sites (3D)")
    fit: Literal["resize", "crop_or_pad"] = Field("resize", description="as `data.fit` of the sites")

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, v: str) -> str:
        return axis_codes(v)

    def geometry(self) -> dict:
        """The `DataConfig` fields that place a scan's voxels: the test split is preprocessed as the sites are."""
        return {"orientation": self.orientation, "spacing": self.spacing, "fit": self.fit}


# the global model's architectures (medfdd.nets builds them; a test keeps the two lists equal)
Architecture = Literal["convnet3", "densenet121"]


class TrainConfig(_Strict):
    epochs: int = Field(300, ge=1, description="epochs of global-model training on the merged set")
    lr: float = Field(0.01, gt=0, description="SGD learning rate (momentum 0.9, divided by 10 at half the epochs)")
    batch_size: int = Field(256, ge=1, description="training batch size")
    architecture: Architecture = Field("convnet3", description="the global model: `convnet3` (ConvNet-3 at `width`) "
                                       "or a MONAI network (`densenet121`: monai.networks.nets.DenseNet121 with "
                                       "instance norm, 2D or 3D, images of at least 64 per side), exported as a MONAI "
                                       "bundle either way")
    width: int = Field(128, ge=1, description="channels of the global ConvNet-3 (`architecture: convnet3`)")
    augment: bool = Field(True, description="differentiable augmentation (DSA) during training")


class FinetuneConfig(_Strict):
    """Hybrid mode: DP-FedAvg rounds after the last distillation round, from the trained global model (the recipe every
    site runs; McMahan et al. 2018 with DP-SGD of Abadi et al. 2016 at each site)."""

    rounds: int = Field(0, ge=0, description="DP fine-tuning rounds after the distillation rounds (0 = off); each "
                        "site must plan at least as many (`privacy.finetune_rounds`)")
    local_epochs: int = Field(1, ge=1, description="local DP-SGD epochs per round (steps = epochs x ceil(n~ / "
                              "batch_size), n~ the site's DP record count)")
    lr: float = Field(0.2, gt=0, description="local SGD learning rate (momentum 0.9)")
    batch_size: int = Field(256, ge=1, description="expected local batch (Poisson sample rate batch_size / n~)")
    clip_norm: float = Field(1.0, gt=0, description="L2 bound on each record's gradient")


class SiteBudget(_Strict):
    """What a site declared to the consortium: its privacy budget (offers above it are rejected)."""

    dp: bool = Field(True, description="false only for declared non-private baselines")
    epsilon: float = Field(1.0, gt=0, description="the site's total epsilon over all rounds")
    delta: float = Field(1e-5, gt=0, lt=1)
    unit: PrivacyUnit = Field("scan", description="what the site's epsilon protects; `patient`: "
                                             "offers whose epsilon protects only scans are rejected")


class ConsortiumConfig(_Strict):
    """What the sites agreed on; every offer is validated against it (engine-independent)."""

    classes: list[str] = Field(min_length=2, description="class names in index order, as in every site config")
    spatial_size: list[int] = Field(min_length=2, max_length=3, description="[H, W] or [D, H, W]")
    channels: Literal[1, 3] = Field(1, description="image channels every offer must have")
    ipc: int = Field(10, ge=1, description="synthetic images per class one site may offer (ipc x classes in all; "
                     "an `allocation: evidence` offer shares them by its own class_evidence)")
    sites: dict[str, SiteBudget] = Field(min_length=1, description="site_id -> `{dp, epsilon, delta, unit}` "
                                         "declared budget (offers above it, or protecting less, are rejected)")
    max_offer_bytes: int = Field(256 * 2**20, ge=1, description="offers announcing more bytes are refused unread")

    @field_validator("sites")
    @classmethod
    def _ids(cls, v: dict[str, SiteBudget]) -> dict[str, SiteBudget]:
        import re

        bad = [s for s in v if not re.match(SITE_ID_PATTERN, s)]
        if bad:
            raise ValueError(f"site ids must match {SITE_ID_PATTERN}, got {bad}")
        return v


AGREEMENT_VERSION = 1


class Agreement(_Strict):
    """What every site of a consortium agrees to, published by the coordinator (`medfdd coordinator agreement`) from
    its config and read by `medfdd site init`: the data layout the offers are validated against, the intensity scaling
    the coordinator's test split uses, the rounds, and each site's declared budget."""

    medfdd_agreement: Literal[1] = Field(AGREEMENT_VERSION, description="format version of this file")
    classes: list[str] = Field(min_length=2, description="class names in index order (`data.classes`)")
    spatial_size: list[int] = Field(min_length=2, max_length=3, description="[H, W] or [D, H, W] (`data.spatial_size`)")
    channels: Literal[1, 3] = Field(1, description="image channels (`data.channels`)")
    intensity: Intensity = Field(default_factory=MinMax, description="intensity scaling every site and the "
                                 "coordinator's test split use (`data.intensity`)")
    orientation: str = Field("RAS", description="axis codes every volume is reoriented to (`data.orientation`)")
    spacing: list[float] | None = Field(None, min_length=3, max_length=3, description="voxel size in mm 3D volumes "
                                        "are resampled to (`data.spacing`); null: none")
    ipc: int = Field(10, ge=1, le=1000, description="synthetic images per class one site offers (`distill.ipc`)")
    rounds: int = Field(DEFAULT_ROUNDS, ge=1, description="federated rounds the sites plan their budget over "
                        "(`privacy.rounds`)")
    finetune_rounds: int = Field(0, ge=0, description="hybrid mode: DP fine-tuning rounds after them "
                                 "(`privacy.finetune_rounds`; 0 = off)")
    sites: dict[str, SiteBudget] = Field(min_length=1, description="site_id -> `{dp, epsilon, delta, unit}`: each "
                                         "site's budget (`privacy.dp`, `epsilon`, `delta`, `unit`)")
    base_dir: Path = Field(Path("."), exclude=True)

    _classes_unique = field_validator("classes")(DataConfig._unique.__func__)
    _sizes = field_validator("spatial_size")(DataConfig._positive.__func__)
    _axcodes = field_validator("orientation")(DataConfig._axcodes.__func__)
    _spacing = field_validator("spacing")(DataConfig._positive_spacing.__func__)
    _site_ids = field_validator("sites")(ConsortiumConfig._ids.__func__)


class RedistillConfig(_Strict):
    """Server-side re-distillation of the merged union (post-processing: no privacy cost)."""

    ipc: int = Field(10, ge=1, description="global images per class")
    iterations: int = Field(200, ge=1, description="distribution-matching steps over the union")
    batch_size: int = Field(256, ge=1, description="union images sampled per step")


class CoordinatorConfig(_Strict):
    sites: list[Path] = Field(default_factory=list,
                              description="site config paths for in-process runs, relative to this file")
    consortium: ConsortiumConfig | None = Field(None, description="agreed classes, sizes and declared budgets "
                                                "(required for Flower; derived from `sites` when absent)")
    rounds: int = Field(DEFAULT_ROUNDS, ge=1, description="federated rounds (sites match the broadcast global model from round 2; "
                        "each site's privacy.rounds must be at least this)")
    merge: Literal["concat", "balanced", "evidence", "redistill"] = Field(
        "evidence", description="`concat` | `balanced` (class-balanced weights) | `evidence` (weight each site's "
                              "images of a class by its released noisy record count) | `redistill` (to "
                              "`redistill.ipc`, post-processing)")
    evidence_power: float = Field(2.0, ge=0, le=4, description="`evidence` merge: weight ~ estimated records^power "
                                  "(2 = inverse-variance pooling of DP class means, 0 = concat)")
    redistill: RedistillConfig = Field(default_factory=RedistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    train_rounds: int = Field(0, ge=0, description="the global model of round r trains on the merged sets of the "
                              "last `train_rounds` rounds (0 = every round so far); earlier rounds' sets are "
                              "already released, so this is post-processing and costs no privacy")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="hybrid mode: DP-FedAvg "
                                     "fine-tuning rounds after the last distillation round (`rounds: 0` = off)")
    test: TestSetConfig | None = Field(None, description="the coordinator's test split (metrics need it)")
    site_timeout_s: float = Field(3600.0, gt=0, description="a site silent this long is left out of the round")
    min_sites: int = Field(1, ge=1, description="quorum: a round (distillation or fine-tuning) completes only when "
                           "at least this many sites' offers are accepted within `site_timeout_s`; otherwise the "
                           "run stops (status `failed`, run.json `stopped`) and can be resumed. At most the number "
                           "of sites")
    output: Path = Field(description="run directory, relative to the config file")
    seed: int = Field(0, ge=0, description="seeds merging and global training")
    base_dir: Path = Field(Path("."), exclude=True)

    @model_validator(mode="after")
    def _has_sites(self) -> CoordinatorConfig:
        if not self.sites and self.consortium is None:
            raise ValueError("give `sites` (config paths, in-process) or `consortium` (agreed spec, Flower)")
        return self

    @property
    def site_paths(self) -> list[Path]:
        return [(self.base_dir / p).resolve() for p in self.sites]

    @property
    def output_dir(self) -> Path:
        return (self.base_dir / self.output).resolve()


M = TypeVar("M", bound=BaseModel)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config models an annotation can hold (through Optional, unions, Annotated, list and dict)."""
    if get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed where `loc` points (its last part is the offending key)."""
    models = [model]
    for part in loc[:-1]:
        inner = [m for m in models if isinstance(part, str) and part in m.model_fields]
        # a field name steps into its models; a union tag, dict key or list index stays on the same models
        models = [x for m in inner for x in _models_in(m.model_fields[part].annotation)] if inner else models
    return sorted({k for m in models for k in m.model_fields if k not in LOADER_KEYS})


def _describe(err: dict[str, Any], model: type[BaseModel]) -> tuple[str, str, str]:
    key = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in {"minmax", "percentile", "ct_window"}))
    kind, msg, got = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(err["loc"][-1]), _valid_keys(model, tuple(err["loc"])), n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        return key, "unknown key" + guess, "correct its spelling or remove it (see docs/configuration.md)"
    if kind == "missing":
        return key, "required key is missing", "add it (see docs/configuration.md)"
    return key, f"{msg} (got {got!r})", "set a value that satisfies the constraint"


LOADER_KEYS = ("base_dir", "source")  # set by the loader, never written in a config file


def parse_config(data: Any, model: type[M], source: str, base_dir: Path) -> M:
    """Validate a mapping into `model`; every problem is reported with its key, value and a fix."""
    if not isinstance(data, dict):
        raise ConfigError(source, f"expected a mapping of keys at the top level, got {type(data).__name__}",
                          "write the config as YAML `key: value` lines")
    for key in LOADER_KEYS:
        if key in data:
            raise ConfigError(f"{source}: key '{key}'", "unknown key", "remove it")
    try:
        return model.model_validate({**data, "base_dir": base_dir})
    except ValidationError as e:
        problems = [_describe(err, model) for err in e.errors()]
        key, problem, fix = problems[0]
        more = "" if len(problems) == 1 else "; also " + "; ".join(f"'{k}': {p}" for k, p, _ in problems[1:])
        raise ConfigError(f"{source}: key '{key}'", problem + more, fix) from None


def load_yaml(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "config file not found", "check the path (site configs live in site_configs/)")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), f"not UTF-8 text ({e.reason} at byte {e.start})", "save the file as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = str(path) if mark is None else f"{path}, line {mark.line + 1}, column {mark.column + 1}"
        problem = " ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        problem = problem.replace("\n", " ")
        raise ConfigError(where, f"not valid YAML ({problem})", "fix the YAML syntax there") from None


def load_site_config(path: Path | str) -> SiteConfig:
    path = Path(path)
    cfg = parse_config(load_yaml(path), SiteConfig, str(path), path.resolve().parent)
    return cfg.model_copy(update={"source": path.resolve()})


def load_coordinator_config(path: Path | str) -> CoordinatorConfig:
    path = Path(path)
    return parse_config(load_yaml(path), CoordinatorConfig, str(path), path.resolve().parent)


def load_agreement(path: Path | str) -> Agreement:
    """A consortium agreement file (`medfdd coordinator agreement` writes it)."""
    path = Path(path)
    data = load_yaml(path)
    if isinstance(data, dict) and "medfdd_agreement" not in data:
        raise ConfigError(str(path), "not a consortium agreement (no `medfdd_agreement` key)",
                          "pass the file the coordinator published with `medfdd coordinator agreement`")
    return parse_config(data, Agreement, str(path), path.resolve().parent)


SCHEMA_MODELS: dict[str, type[BaseModel]] = {"site": SiteConfig, "coordinator": CoordinatorConfig,
                                             "agreement": Agreement}
SCHEMA_FILE = "medfdd-{kind}.schema.json"  # the name `medfdd config schema` and `medfdd site init` give the files


def json_schema(kind: str) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a config file as written: the model's validation schema without the keys the
    loader sets, for editors (yaml-language-server) and other tools."""
    model = SCHEMA_MODELS[kind]
    schema = model.model_json_schema(mode="validation")
    for key in LOADER_KEYS:
        schema["properties"].pop(key, None)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text(kind: str) -> str:
    """The schema file of a config kind (`medfdd config schema KIND`; docs/schemas/ holds each)."""
    return json.dumps(json_schema(kind), indent=2) + "\n"


def dump_config(cfg: BaseModel, exclude: set[str] | None = None) -> str:
    """YAML text of a config (paths as strings, defaults included; top-level keys in `exclude` left out), loadable
    by the matching loader."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude=exclude), sort_keys=False)
