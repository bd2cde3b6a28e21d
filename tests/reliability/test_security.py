"""Security: nothing is unpickled anywhere (invariant 6) and no PHI leaves a site (invariant 5).

The PHI test writes DICOM files whose headers carry recognisable patient data (name, id, birth date, institution,
study date, referring physician) into folders named after the patient, with patient ids in the manifest, runs the
whole pipeline in-process (site check -> distill -> offers -> coordinator round -> audit report) and searches every
artifact, offer, report and log line for those strings.

What the operator's console of `medfdd site check` may show (it stays at the site): file paths relative to the data
root, the data root and quarantine report path, reason codes and counts. It must never print a DICOM header value.
Everything that can leave the site or be shown to others (synthetic set, ledger, offer, run directory, audit report,
distill and coordinator logs) must hold no header value, patient id or file path.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from rich.console import Console

from medfdd.config import load_coordinator_config, load_site_config
from medfdd.federation.inprocess import open_inprocess
from medfdd.prepare.writers import write_dicom
from medfdd.site.check import check_site
from medfdd.site.offer import make_offer

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------ no pickle (inv. 6)

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def unsafe_deserialisation(source: str, filename: str = "<src>") -> list[str]:
    """Every place in `source` that could unpickle: pickle-family imports, torch.load without weights_only=True,
    np.load without allow_pickle=False, allow_pickle=True, yaml.load/unsafe_load/full_load, pandas read_pickle."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in PICKLE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            if mod in {"torch", "numpy"} and any(a.name == "load" for a in node.names):
                found.append(f"{where}: from {node.module} import load (unchecked load)")
        elif isinstance(node, ast.Call):
            if _kw(node, "allow_pickle") is True:
                found.append(f"{where}: allow_pickle=True")
            f = node.func
            if not isinstance(f, ast.Attribute):
                continue
            owner = f.value.id if isinstance(f.value, ast.Name) else None
            if f.attr == "load" and owner == "torch" and _kw(node, "weights_only") is not True:
                found.append(f"{where}: torch.load without weights_only=True")
            if f.attr == "load" and owner in {"np", "numpy"} and _kw(node, "allow_pickle") is not False:
                found.append(f"{where}: np.load without allow_pickle=False")
            if owner == "yaml" and (f.attr in {"unsafe_load", "full_load", "unsafe_load_all", "full_load_all"}
                                    or (f.attr in {"load", "load_all"} and "Safe" not in ast.unparse(node))):
                found.append(f"{where}: yaml.{f.attr} (not safe_load)")
            if f.attr == "read_pickle":
                found.append(f"{where}: read_pickle")
    return found


def test_the_scanner_finds_each_kind_of_unpickling():
    bad = """
import pickle
import joblib as jl
from dill import loads
from torch import load
import torch, numpy as np, yaml, pandas as pd
torch.load("m.pt")
torch.load("m.pt", weights_only=False)
np.load("a.npy")
np.load("a.npz", allow_pickle=True)
np.save("a.npy", x, allow_pickle=True)
yaml.load(text)
yaml.unsafe_load(text)
pd.read_pickle("x")
"""
    lines = {int(hit.split(":")[1]) for hit in unsafe_deserialisation(bad)}
    assert lines == set(range(2, 15)) - {6}  # every line but the plain imports
    good = """
import torch, numpy as np, yaml
torch.load("m.pt", weights_only=True)
np.load("a.npz", allow_pickle=False)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
"""
    assert unsafe_deserialisation(good) == []


# check -> (what is tried, expected outcome, test)
SECURITY = {
    "no unpickling (invariant 6)": (
        "AST scan of every .py in medfdd/ and privacy/ for pickle-family imports, torch.load without "
        "weights_only=True, np.load without allow_pickle=False, allow_pickle=True, yaml.load, read_pickle",
        "none found (the scanner itself is tested on 13 planted violations)",
        "test_no_code_in_medfdd_or_privacy_can_unpickle"),
    "no PHI leaves a site (invariant 5)": (
        "DICOM headers with recognisable PatientName, PatientID, PatientBirthDate, InstitutionName, StudyDate, "
        "ReferringPhysicianName, AccessionNumber; patient-named folders; patient ids in the manifest; a full "
        "in-process round and audit report",
        "none of them in synthetic.npz/json, ledger, preview PNG (text chunks too), offers (meta and arrays), the "
        "run directory (run.json, checkpoint, merged.npz, model, previews), report.json/html, or the distill, "
        "coordinator and audit logs; `site check`'s console shows no header value (paths under the root allowed)",
        "test_no_phi_in_artifacts_offers_run_directory_report_or_logs"),
}


def test_no_code_in_medfdd_or_privacy_can_unpickle():
    files = sorted(p for d in ("medfdd", "privacy") for p in (REPO / d).rglob("*.py"))
    assert len(files) > 30
    found = [hit for p in files for hit in unsafe_deserialisation(p.read_text(), str(p.relative_to(REPO)))]
    assert found == []


# ------------------------------------------------------------------------------------------ no PHI (inv. 5)

PHI = {  # DICOM keyword -> a value no pipeline would make up
    "PatientName": "QUIMBY^ZELDA^ROSALIND",
    "PatientID": "MRN9081726354",
    "PatientBirthDate": "19310517",
    "InstitutionName": "ST XAVIER MERCY GENERAL",
    "StudyDate": "19970823",
    "ReferringPhysicianName": "WOMBATFACE^HORATIO",
    "AccessionNumber": "ACC55512873",
}
# what must be searched for: each value, its parts, and the folder and manifest strings
NEEDLES = sorted({*PHI.values(), "QUIMBY", "ZELDA", "ROSALIND", "XAVIER", "WOMBATFACE", "HORATIO",
                  "ZeldaQuimby", "MRN90817", "19310517", "19970823", "XavierMercy"})
HEADER_NEEDLES = sorted(set(NEEDLES) - {"ZeldaQuimby", "XavierMercy"})  # the folder names are paths, not headers
CLASSES = ["zero", "one", "two", "three"]


def _phi_site(base: Path, site_id: str, images: np.ndarray, labels: np.ndarray) -> Path:
    """DICOM files with PHI in every header, in per-patient folders named after the patient."""
    root = base / f"XavierMercy-PACS-export-{site_id}"
    rng = np.random.default_rng(0)
    rows = []
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        pid = f"MRN90817{i:05d}"
        rel = f"ZeldaQuimby_{pid}/study_19970823/img_{i:03d}.dcm"
        write_dicom(root / rel, img, patient_id=pid, rng=rng, extra={**PHI, "PatientID": pid})
        rows.append([rel, CLASSES[y], pid])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "patient_id"], *rows])
    cfg = {"site_id": site_id,
           "data": {"root": root.name, "classes": CLASSES, "spatial_size": [8, 8], "holdout_fraction": 0.25},
           "privacy": {"epsilon": 2.0, "delta": 1e-5},
           "distill": {"method": "dm", "ipc": 2, "iterations": 4, "batch_size": 32, "width": 8, "inner_steps": 2,
                       "lr": 1.0, "checkpoint_every": 2},
           "output": f"site-out/{site_id}", "device": "cpu"}
    path = base / f"{site_id}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def phi_consortium(tmp_path_factory):
    from sklearn.datasets import load_digits

    base = tmp_path_factory.mktemp("phi")
    d = load_digits()
    keep = np.flatnonzero(d.target < len(CLASSES))[:128]
    images, labels = (d.images[keep] * 15).astype(np.uint8), d.target[keep]
    sites = [_phi_site(base, f"site-{k}", images[k::2], labels[k::2]) for k in range(2)]
    coord = base / "coordinator.yaml"
    coord.write_text(yaml.safe_dump({"sites": [p.name for p in sites], "rounds": 1, "output": "runs/phi",
                                     "train": {"epochs": 3, "width": 8, "batch_size": 64, "augment": False}}))
    return base, sites, coord


def _text_of_png(path: Path) -> str:
    with Image.open(path) as im:
        return json.dumps({str(k): str(v) for k, v in {**im.info, **getattr(im, "text", {})}.items()})


def _searchable(path: Path) -> list[bytes]:
    """Raw bytes plus decoded views (npz members, PNG text chunks) of one file."""
    raw = path.read_bytes()
    views = [raw]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            views += [n.encode() for n in z.namelist()] + [z.read(n) for n in z.namelist()]
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        views.append(_text_of_png(path).encode())
    return views


def _leaks(blobs: dict[str, list[bytes]], needles: list[str]) -> list[str]:
    hits = []
    for name, views in blobs.items():
        for n in needles:
            for enc in {n.encode(), n.upper().encode(), n.lower().encode()}:
                if any(enc in v for v in views):
                    hits.append(f"{n!r} in {name}")
    return sorted(set(hits))


def test_no_phi_in_artifacts_offers_run_directory_report_or_logs(phi_consortium):
    from medfdd.site.evaluate import evaluate_at_site
    from privacy.audit.run import audit_run
    from privacy.audit.spec import AuditSpec
    from privacy.report.build import write_report

    base, sites, coord = phi_consortium
    # the PHI really is in the input: the test would catch a pipeline that copied it
    first = next((base / "XavierMercy-PACS-export-site-0").rglob("*.dcm"))
    assert str(pydicom.dcmread(first).PatientName) == PHI["PatientName"] and "ZeldaQuimby" in str(first)

    check_log = io.StringIO()
    for s in sites:
        report = check_site(load_site_config(s), console=Console(file=check_log, width=200))
        assert report.n_used == 64 and report.n_quarantined == 0
    # the operator's console at the site: never a header value (paths under the data root are allowed there)
    assert _leaks({"site check console": [check_log.getvalue().encode()]}, HEADER_NEEDLES) == []

    log = io.StringIO()
    console = Console(file=log, width=200)
    run = open_inprocess(load_coordinator_config(coord), console=console)
    b = run.broadcast()
    offers = {}
    for s in sites:
        offer = make_offer(load_site_config(s), b, console=console)
        offers[offer.site_id] = offer
        assert run.receive(offer, sender=offer.site_id)
    run.finish_round()
    run_dir = run.close()
    outcome = audit_run(run_dir, AuditSpec(attacks=["loss", "dcr"]), console=console)
    report_dir = base / "audits" / "phi"
    write_report(outcome, report_dir)

    eval_log = io.StringIO()
    for s in sites:  # the site's own evaluation of the global model: it stays at the site, and holds no PHI either
        evaluate_at_site(load_site_config(s), run_dir / "global_model.safetensors", console=Console(file=eval_log, width=200))
    assert _leaks({"site evaluate console": [eval_log.getvalue().encode()]}, HEADER_NEEDLES) == []

    blobs: dict[str, list[bytes]] = {"distill + coordinator + audit log": [log.getvalue().encode()]}
    for sid, o in offers.items():
        blobs[f"offer {sid}"] = [json.dumps(o.meta, default=str).encode(), o.site_id.encode(),
                                 *(a.data for a in o.arrays.values()), *(k.encode() for k in o.arrays)]
    released = ("synthetic.npz", "synthetic.json", "privacy_ledger.json", "synthetic_preview.png", "evaluation.json",
                "evaluation.png")
    for s in sites:
        out = base / "site-out" / yaml.safe_load(s.read_text())["site_id"]
        for name in released:
            blobs[str(out / name)] = _searchable(out / name)
    shared = [p for d in (run_dir, report_dir) for p in d.rglob("*") if p.is_file()]
    assert {"run.json", "checkpoint.json", "merged.npz", "global_model.safetensors", "merged_preview.png",
            "report.json", "report.html"} <= {p.name for p in shared}
    for p in shared:
        blobs[str(p)] = _searchable(p)
    assert _leaks(blobs, NEEDLES) == []
    # positive control: the search does find the data root's folder name in quarantine.json, which stays at the site
    q = base / "site-out" / "site-0" / "quarantine.json"
    assert _leaks({str(q): _searchable(q)}, NEEDLES) == [f"'XavierMercy' in {q}"]
