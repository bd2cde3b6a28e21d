"""Starting a real consortium (issue 39 item 6): the coordinator publishes the agreement, a site builds its config and
labels.csv from it and a folder-per-class export of real DICOM / NIfTI / PNG files, and `site check` accepts the
result unchanged. Every refusal names the file or folder and writes nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import yaml

from medfdd import exit_codes
from medfdd.cli import main
from medfdd.config import json_schema, load_agreement, load_site_config
from medfdd.prepare.writers import write_dicom, write_dicom_series, write_nifti, write_png

CLASSES = ["normal", "pneumonia"]
WINDOW = {"mode": "ct_window", "center": -600.0, "width": 1500.0}


def _coordinator(folder: Path, *, spatial_size=(16, 16), rounds: int = 2, finetune_rounds: int = 0) -> Path:
    """A Flower-style coordinator config: the consortium block is the single source of truth."""
    cfg = {
        "consortium": {"classes": CLASSES, "spatial_size": list(spatial_size), "channels": 1, "ipc": 4,
                       "sites": {"hospital-a": {"dp": True, "epsilon": 2.0, "delta": 1e-6},
                                 "hospital-b": {"epsilon": 1.0, "delta": 1e-5, "unit": "patient"}}},
        "rounds": rounds,
        "finetune": {"rounds": finetune_rounds},
        "test": {"root": "../test", "intensity": WINDOW},
        "output": "../runs/coordinator",
    }
    path = folder / "coordinator.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _agreement(tmp_path: Path, **kw) -> Path:
    out = tmp_path / "agreement.yaml"
    assert main(["coordinator", "agreement", str(_coordinator(tmp_path / "coord", **kw)), "--out", str(out)]) == 0
    return out


def _pixels(rng, shape=(16, 16)) -> np.ndarray:
    return rng.integers(0, 4096, size=shape, dtype=np.uint16)


def _export(root: Path) -> dict[str, tuple[str, str]]:
    """A folder-per-class export in three formats; -> manifest path -> (label, expected patient id)."""
    rng = np.random.default_rng(7)
    write_dicom(root / "normal/P001/img1.dcm", _pixels(rng), patient_id="PAT-1", rng=rng)
    write_dicom(root / "normal/P001/IM0002", _pixels(rng), patient_id="PAT-1", rng=rng)  # no suffix: DICOM magic
    write_png(root / "normal/P002/a.png", rng.integers(0, 255, size=(20, 20), dtype=np.uint8))
    write_nifti(root / "normal/loose.nii.gz", rng.normal(size=(16, 16)).astype(np.float32))
    write_dicom(root / "pneumonia/scan1.dcm", _pixels(rng), patient_id="PAT-2", rng=rng)
    write_nifti(root / "pneumonia/P003/vol.nii", rng.normal(size=(16, 16)).astype(np.float32))
    write_png(root / "pneumonia/P004/b.png", rng.integers(0, 255, size=(16, 16), dtype=np.uint8))
    write_png(root / "pneumonia/P004/c.png", rng.integers(0, 255, size=(16, 16), dtype=np.uint8))
    (root / ".DS_Store").write_bytes(b"\0\1")
    (root / "normal/P002/.thumbs").write_text("x")
    write_dicom(root / "pneumonia/DICOMDIR", _pixels(rng), patient_id="PAT-9", rng=rng)  # an index: skipped
    return {"normal/P001/IM0002": ("normal", "PAT-1"), "normal/P001/img1.dcm": ("normal", "PAT-1"),
            "normal/P002/a.png": ("normal", "P002"), "normal/loose.nii.gz": ("normal", ""),
            "pneumonia/P003/vol.nii": ("pneumonia", "P003"), "pneumonia/P004/b.png": ("pneumonia", "P004"),
            "pneumonia/P004/c.png": ("pneumonia", "P004"), "pneumonia/scan1.dcm": ("pneumonia", "PAT-2")}


def _rows(manifest: Path) -> dict[str, tuple[str, str]]:
    with open(manifest, newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["path", "label", "patient_id"]
        return {p: (label, pid) for p, label, pid in reader}


def _init(tmp_path: Path, agreement: Path, data: Path, *extra: str, site: str = "hospital-a") -> list[str]:
    return ["site", "init", "--agreement", str(agreement), "--site-id", site, "--data", str(data),
            "--out", str(tmp_path / "site_configs" / f"{site}.yaml"), "--output", str(tmp_path / "runs" / site),
            *extra]


def test_the_agreement_is_the_coordinator_configs_consortium(tmp_path):
    agreement = load_agreement(_agreement(tmp_path))
    assert agreement.medfdd_agreement == 1
    assert agreement.classes == CLASSES and agreement.spatial_size == [16, 16] and agreement.channels == 1
    assert agreement.ipc == 4 and agreement.rounds == 2 and agreement.finetune_rounds == 0
    assert agreement.intensity.model_dump() == WINDOW  # the coordinator's test split is scaled so: sites must match
    assert agreement.sites["hospital-a"].epsilon == 2.0 and agreement.sites["hospital-a"].delta == 1e-6
    assert agreement.sites["hospital-b"].unit == "patient"
    text = (tmp_path / "agreement.yaml").read_text()
    assert text.splitlines()[2] == "medfdd_agreement: 1"  # after the two header comments
    import jsonschema

    jsonschema.validate(yaml.safe_load(text), json_schema("agreement"))


def test_the_agreement_of_in_process_site_configs_and_their_disagreement(tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    for sid, orientation in (("hospital-a", "LPS"), ("hospital-b", "LPS")):
        (folder / f"{sid}.yaml").write_text(yaml.safe_dump({
            "site_id": sid, "data": {"root": f"../{sid}", "classes": CLASSES, "spatial_size": [8, 16, 16],
                                     "orientation": orientation, "spacing": [2.0, 1.0, 1.0],
                                     "intensity": {"mode": "percentile", "lower": 1.0, "upper": 99.0}},
            "privacy": {"epsilon": 3.0, "rounds": 4}, "distill": {"ipc": 6}, "output": f"../runs/{sid}"}))
    coord = folder / "coordinator.yaml"
    coord.write_text(yaml.safe_dump({"sites": ["hospital-a.yaml", "hospital-b.yaml"], "rounds": 4,
                                     "output": "../runs/coordinator"}))
    out = tmp_path / "agreement.yaml"
    assert main(["coordinator", "agreement", str(coord), "--out", str(out)]) == 0
    agreement = load_agreement(out)
    assert agreement.orientation == "LPS" and agreement.spacing == [2.0, 1.0, 1.0] and agreement.ipc == 6
    assert agreement.intensity.model_dump() == {"mode": "percentile", "lower": 1.0, "upper": 99.0}
    assert sorted(agreement.sites) == ["hospital-a", "hospital-b"] and agreement.sites["hospital-b"].epsilon == 3.0

    b = yaml.safe_load((folder / "hospital-b.yaml").read_text())
    b["data"]["orientation"] = "RAS"
    (folder / "hospital-b.yaml").write_text(yaml.safe_dump(b))
    out.unlink()
    assert main(["coordinator", "agreement", str(coord), "--out", str(out)]) == exit_codes.RUNTIME_ERROR
    assert not out.exists()


def test_site_init_writes_the_manifest_and_a_config_that_site_check_accepts(tmp_path, capsys):
    agreement_path = _agreement(tmp_path)
    export = tmp_path / "export"
    expected = _export(export)
    capsys.readouterr()
    assert main([*_init(tmp_path, agreement_path, export), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    assert _rows(export / "labels.csv") == expected
    assert result["scans_per_class"] == {"normal": 4, "pneumonia": 4}
    assert result["patient_id_from"] == {"dicom": 3, "folder": 4, "none": 1}
    assert sorted(s["path"] for s in result["skipped"]) == [".DS_Store", "normal/P002/.thumbs", "pneumonia/DICOMDIR"]

    cfg_path = tmp_path / "site_configs" / "hospital-a.yaml"
    assert cfg_path.read_text().splitlines()[0] == "# yaml-language-server: $schema=medfdd-site.schema.json"
    assert json.loads((cfg_path.parent / "medfdd-site.schema.json").read_text()) == json_schema("site")
    cfg = load_site_config(cfg_path)
    agreed = load_agreement(agreement_path)
    assert (cfg.privacy.dp, cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.unit) == (True, 2.0, 1e-6, "scan")
    assert cfg.privacy.rounds == agreed.rounds == 2 and cfg.distill.ipc == agreed.ipc
    assert cfg.data.classes == CLASSES and cfg.data.spatial_size == [16, 16]
    assert cfg.data.intensity.model_dump() == WINDOW
    assert cfg.data_root == export.resolve() and cfg.output_dir == (tmp_path / "runs" / "hospital-a").resolve()
    assert cfg.data.root == Path("../export")  # relative to the config file, like every config path
    import jsonschema

    jsonschema.validate(yaml.safe_load(cfg_path.read_text()), json_schema("site"))

    before = cfg_path.read_text()
    assert main(["site", "check", str(cfg_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_rows"] == 8 and report["n_used"] == 8 and report["n_quarantined"] == 0, report["by_reason"]
    assert report["class_counts"] == {"normal": 4, "pneumonia": 4}
    assert cfg_path.read_text() == before


def test_patient_ids_by_folder_only_or_none(tmp_path, capsys):
    agreement = _agreement(tmp_path)
    export = tmp_path / "export"
    expected = _export(export)
    assert main([*_init(tmp_path, agreement, export), "--patient-id", "folder"]) == 0
    rows = _rows(export / "labels.csv")
    assert rows["normal/P001/img1.dcm"] == ("normal", "P001") and rows["pneumonia/scan1.dcm"] == ("pneumonia", "")
    assert main([*_init(tmp_path, agreement, export), "--patient-id", "none", "--force"]) == 0
    assert _rows(export / "labels.csv") == {p: (label, "") for p, (label, _) in expected.items()}


def test_a_hybrid_consortium_and_a_patient_level_budget_reach_the_site_config(tmp_path, capsys):
    agreement = _agreement(tmp_path, finetune_rounds=3)
    assert load_agreement(agreement).finetune_rounds == 3
    export = tmp_path / "export"
    _export(export)
    capsys.readouterr()
    assert main(_init(tmp_path, agreement, export, site="hospital-b")) == 0
    assert "1 scan(s) have no patient id" in " ".join(capsys.readouterr().out.split())  # quarantined under `patient`
    cfg = load_site_config(tmp_path / "site_configs" / "hospital-b.yaml")
    assert (cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.unit) == (1.0, 1e-5, "patient")
    assert cfg.privacy.finetune_rounds == 3 and 0 < cfg.privacy.finetune_share < 1  # the share: the site's default
    assert cfg.privacy.rounds * cfg.distill.iterations >= 100  # about the recommended 100 paid steps over the rounds


def test_a_3d_export_lists_each_series_folder_once(tmp_path, capsys):
    agreement = _agreement(tmp_path, spatial_size=(4, 16, 16))
    export = tmp_path / "export"
    rng = np.random.default_rng(3)
    for k, label in enumerate(CLASSES * 2):
        write_dicom_series(export / label / f"P{k}" / "series1", _pixels(rng, (4, 16, 16)), patient_id=f"PAT-{k}",
                           rng=rng)
        write_nifti(export / label / f"vol{k}.nii.gz", rng.normal(size=(4, 16, 16)).astype(np.float32))
    write_dicom_series(export / "normal" / "series9", _pixels(rng, (3, 16, 16)), patient_id="", rng=rng)
    assert main(_init(tmp_path, agreement, export)) == 0
    rows = _rows(export / "labels.csv")
    assert rows["normal/P0/series1"] == ("normal", "PAT-0") and rows["pneumonia/P3/series1"] == ("pneumonia", "PAT-3")
    assert rows["normal/series9"] == ("normal", "")  # a series folder right in the class folder names no patient
    assert rows["pneumonia/vol1.nii.gz"] == ("pneumonia", "")
    assert len(rows) == 9
    capsys.readouterr()
    assert main(["site", "check", str(tmp_path / "site_configs" / "hospital-a.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_used"] == 9, report["by_reason"]

    for extra in ("note.png", "notes.txt"):  # a scan or an unknown file beside the slices: refused, even skipped
        if extra.endswith(".png"):
            write_png(export / "normal" / "P0" / "series1" / extra, rng.integers(0, 255, (16, 16), dtype=np.uint8))
        else:
            (export / "normal" / "P0" / "series1" / extra).write_text("text")
        capsys.readouterr()
        assert main([*_init(tmp_path, agreement, export), "--force", "--skip-unknown"]) == exit_codes.RUNTIME_ERROR
        assert f"next to ['{extra}']" in " ".join(capsys.readouterr().err.split())
        (export / "normal" / "P0" / "series1" / extra).unlink()


# ------------------------------------------------------------------------------------------------------- refusals


def _refused(tmp_path, capsys, argv: list[str], *phrases: str) -> None:
    capsys.readouterr()
    assert main(argv) == exit_codes.RUNTIME_ERROR
    err = " ".join(capsys.readouterr().err.split())
    for phrase in phrases:
        assert phrase in err, err
    assert "Fix:" in err and "Traceback" not in err
    assert not (tmp_path / "site_configs" / "hospital-a.yaml").exists()


def test_a_folder_that_is_no_agreed_class_is_refused(tmp_path, capsys):
    agreement = _agreement(tmp_path)
    export = tmp_path / "export"
    _export(export)
    write_png(export / "covid" / "x.png", np.arange(256, dtype=np.uint8).reshape(16, 16))
    _refused(tmp_path, capsys, _init(tmp_path, agreement, export), "['covid']", "not classes of the agreement")
    assert not (export / "labels.csv").exists()


def test_an_agreed_class_without_folder_or_scans_is_refused_unless_allowed(tmp_path, capsys):
    agreement = _agreement(tmp_path)
    export = tmp_path / "export"
    write_png(export / "normal" / "P1" / "x.png", np.arange(256, dtype=np.uint8).reshape(16, 16))
    _refused(tmp_path, capsys, _init(tmp_path, agreement, export), "['pneumonia']", "no folder or no scans")
    (export / "pneumonia" / "empty").mkdir(parents=True)
    (export / "pneumonia" / ".hidden.png").write_bytes(b"x")
    _refused(tmp_path, capsys, _init(tmp_path, agreement, export), "['pneumonia']")
    capsys.readouterr()
    assert main([*_init(tmp_path, agreement, export), "--allow-missing-classes", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["missing_classes"] == ["pneumonia"] and result["scans_per_class"] == {"normal": 1, "pneumonia": 0}
    assert load_site_config(tmp_path / "site_configs" / "hospital-a.yaml").data.classes == CLASSES  # indices kept


def test_files_of_unknown_format_are_refused_or_skipped_and_listed(tmp_path, capsys):
    agreement = _agreement(tmp_path)
    export = tmp_path / "export"
    expected = _export(export)
    (export / "normal" / "P002" / "report.txt").write_text("not an image")
    (export / "README").write_text("export notes")
    _refused(tmp_path, capsys, _init(tmp_path, agreement, export), "2 file(s)", "normal/P002/report.txt", "README",
             "--skip-unknown")
    capsys.readouterr()
    assert main([*_init(tmp_path, agreement, export), "--skip-unknown", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"path": "normal/P002/report.txt", "reason": "unknown format or outside every class folder"} in \
        result["skipped"] and any(s["path"] == "README" for s in result["skipped"])
    assert _rows(export / "labels.csv") == expected


def test_a_format_the_operator_fixed_refuses_files_of_another(tmp_path, capsys):
    agreement = _agreement(tmp_path)
    export = tmp_path / "export"
    _export(export)
    _refused(tmp_path, capsys, [*_init(tmp_path, agreement, export), "--format", "dicom"], "not dicom files",
             "normal/P002/a.png")


def test_an_existing_config_or_manifest_is_kept_unless_forced(tmp_path, capsys):
    agreement = _agreement(tmp_path)
    export = tmp_path / "export"
    expected = _export(export)
    (export / "labels.csv").write_text("path,label\nmine.png,normal\n")
    _refused(tmp_path, capsys, _init(tmp_path, agreement, export), "labels.csv", "already exist", "--force")
    assert (export / "labels.csv").read_text() == "path,label\nmine.png,normal\n"
    config = tmp_path / "site_configs" / "hospital-a.yaml"
    config.parent.mkdir()
    config.write_text("site_id: edited\n")
    (export / "labels.csv").unlink()
    capsys.readouterr()
    assert main(_init(tmp_path, agreement, export)) == exit_codes.RUNTIME_ERROR
    assert "already exist" in capsys.readouterr().err and config.read_text() == "site_id: edited\n"
    assert not (export / "labels.csv").exists()
    assert main([*_init(tmp_path, agreement, export), "--force"]) == 0
    assert load_site_config(config).site_id == "hospital-a" and _rows(export / "labels.csv") == expected


def test_a_site_id_not_in_the_agreement_is_refused(tmp_path, capsys):
    agreement = _agreement(tmp_path)
    export = tmp_path / "export"
    _export(export)
    _refused(tmp_path, capsys, _init(tmp_path, agreement, export, site="hospital-z"), "'hospital-z'",
             "not in the agreement", "['hospital-a', 'hospital-b']")
    assert not (export / "labels.csv").exists()


def test_a_file_that_is_no_agreement_is_refused(tmp_path, capsys):
    export = tmp_path / "export"
    _export(export)
    coord = _coordinator(tmp_path / "coord")
    _refused(tmp_path, capsys, _init(tmp_path, coord, export), "no `medfdd_agreement` key")
