"""Synthetic volumes exported as NIfTI (`artifacts.save_volumes_nifti`): a valid affine in the site's orientation and
voxel size, and the file loads back through the site's own loader to the arrays that were written."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medfdd.artifacts import save_volumes_nifti, volume_affine
from medfdd.config import DataConfig
from medfdd.data.load import load_scan
from medfdd.data.site_data import load_site_data


def _volumes(n: int, shape=(6, 7, 5), seed: int = 0) -> np.ndarray:
    """[N, 1, D, H, W] in [0, 1] with both ends reached (min-max scaling then leaves them unchanged)."""
    v = np.random.default_rng(seed).random((n, 1, *shape)).astype(np.float32)
    v[:, :, 0, 0, 0], v[:, :, -1, -1, -1] = 0.0, 1.0
    return v


@pytest.mark.parametrize("orientation, voxel", [("RAS", [2.0, 3.0, 4.0]), ("LPS", [1.5, 1.5, 3.0]),
                                                ("PIR", [0.8, 1.0, 1.2])])
def test_affine_is_the_orientation_times_the_voxel_size(tmp_path, orientation, voxel):
    images = _volumes(3)
    img = nib.load(save_volumes_nifti(tmp_path / "s.nii.gz", images, orientation=orientation, voxel_size=voxel))
    assert img.shape == (5, 7, 6, 3)  # (x, y, z, N): the orientation axes, then the volumes
    assert int(img.header["sform_code"]) == 2 and int(img.header["qform_code"]) == 2
    np.testing.assert_allclose(img.header.get_zooms()[:3], voxel)
    a = img.affine[:3, :3]
    direction = a / np.linalg.norm(a, axis=0)
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-6)  # orthonormal
    assert "".join(nib.aff2axcodes(img.affine)) == orientation
    np.testing.assert_allclose(img.affine @ [2, 3, 2.5, 1], [0, 0, 0, 1], atol=1e-5)  # centred on the origin
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-5)  # viewers reading either agree


def test_unknown_voxel_size_is_written_as_nominal(tmp_path):
    img = nib.load(save_volumes_nifti(tmp_path / "s.nii.gz", _volumes(2), orientation="LAS"))
    np.testing.assert_allclose(img.header.get_zooms()[:3], [1, 1, 1])
    assert b"nominal" in img.header["descrip"].tobytes()
    assert "".join(nib.aff2axcodes(img.affine)) == "LAS"


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_exported_volumes_load_back_through_the_site_loader(tmp_path, orientation):
    """Each exported volume, as its own NIfTI with the exported affine, loads (reoriented, at the exported spacing,
    cropped/padded to the same size) to exactly the array that was exported; under the other orientation, to its
    mirror along the flipped axes."""
    images = _volumes(2, shape=(6, 7, 5), seed=1)
    spacing = [1.5, 2.0, 2.5]
    four_d = nib.load(save_volumes_nifti(tmp_path / "s.nii.gz", images, orientation=orientation, voxel_size=spacing))
    data = np.asarray(four_d.dataobj)
    cfg = DataConfig(root=tmp_path, classes=["a", "b"], spatial_size=[6, 7, 5], orientation=orientation,
                     spacing=spacing, fit="crop_or_pad")
    assert cfg.voxel_size == spacing
    other = "LPS" if orientation == "RAS" else "RAS"
    for n in range(2):
        path = tmp_path / f"v{n}.nii.gz"
        nib.save(nib.Nifti1Image(data[..., n], four_d.affine), str(path))
        back, _ = load_scan(path, root=tmp_path, cfg=cfg)
        np.testing.assert_allclose(back, images[n], atol=1e-5)
        flipped, _ = load_scan(path, root=tmp_path, cfg=cfg.model_copy(update={"orientation": other}))
        # RAS <-> LPS flips x and y, i.e. the last two row-major axes (W, H)
        np.testing.assert_allclose(flipped, images[n][:, :, ::-1, ::-1], atol=1e-5)


def test_crop_or_pad_keeps_the_voxel_size_and_is_part_of_the_cache_key(tmp_path):
    from medfdd.data.cache import settings_fingerprint

    base = dict(root=tmp_path, classes=["a", "b"], spatial_size=[8, 8, 8], spacing=[2.0, 2.0, 2.0])
    resize, crop = DataConfig(**base), DataConfig(**base, fit="crop_or_pad")
    assert resize.voxel_size is None and crop.voxel_size == [2.0, 2.0, 2.0]
    assert settings_fingerprint(resize) != settings_fingerprint(crop)
    # a 12 x 10 x 6 volume at 2 mm: cropped in x and y, zero-padded in z (centred), never interpolated
    vol = np.zeros((6, 10, 12), dtype=np.float32)  # row-major [z, y, x]
    vol[2:4, 4:6, 5:7] = 1.0
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), np.diag([2.0, 2.0, 2.0, 1.0])),
             str(tmp_path / "v.nii.gz"))
    out, _ = load_scan(tmp_path / "v.nii.gz", root=tmp_path, cfg=crop)
    assert out.shape == (1, 8, 8, 8)
    assert set(np.unique(out)) == {0.0, 1.0} and out.sum() == vol.sum()  # no interpolation: the same voxels
    assert out[0, 1:7].sum() == vol.sum() and out[0, [0, 7]].sum() == 0  # z padded by one slice each side
    assert volume_affine((8, 8, 8), "RAS", crop.voxel_size)[0, 0] == 2.0


def test_a_site_with_crop_or_pad_loads(tmp_path):
    """The option goes through the site loader (cache, store) as well as `load_scan`."""
    from medfdd.config import SiteConfig
    from medfdd.prepare.writers import write_nifti

    rows = ["path,label"]
    for i in range(4):
        write_nifti(tmp_path / f"v{i}.nii.gz", _volumes(1, shape=(9, 10, 11), seed=i)[0, 0],
                    affine=np.diag([2.0, 2.0, 2.0, 1.0]))
        rows.append(f"v{i}.nii.gz,{'ab'[i % 2]}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = SiteConfig(site_id="s", data={"root": tmp_path, "classes": ["a", "b"], "spatial_size": [8, 8, 8],
                                        "spacing": [2.0, 2.0, 2.0], "fit": "crop_or_pad", "holdout_fraction": 0.0},
                     output=tmp_path / "out", workers=1)
    data = load_site_data(cfg)
    assert data.images.shape == (4, 1, 8, 8, 8)
