"""Tests for the synthetic CT cohort (ssl_utils.synthetic): determinism, labels, realism, on-disk layout, reuse."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import ssl_utils.synthetic as synthetic
from ssl_utils.organs import ORGANS
from ssl_utils.synthetic import generate_subject, make_cohort_from_config, make_synthetic_dataset

SHAPE = (64, 64)
SPACING = (6.0, 6.0, 8.0)  # the coarsest supported spacing
SMALL = dict(
    n_unlabeled=2,
    n_unlabeled_val=1,
    n_labeled_train=2,
    n_labeled_val=1,
    train_sizes=(1, 2),
    shape=SHAPE,
    spacing=SPACING,
    progress=False,
)


# Golden reference: hashes of the generator's output, recorded from the original (pre-refactor) _render.
# Regenerate only on a deliberate change of the synthetic anatomy:  python tests/test_synthetic.py --write-golden
GOLDEN_PATH = Path(__file__).parent / "golden" / "synthetic.json"
GOLDEN_SUBJECTS = [
    *(dict(seed=s, shape=[64, 64], spacing=[6.0, 6.0, 8.0], kind="btcv", with_label=True) for s in (0, 1, 2, 7)),
    *(dict(seed=s, shape=[64, 64], spacing=[6.0, 6.0, 8.0], kind="tcia", with_label=False) for s in (0, 3)),
    dict(seed=4, shape=[96, 96], spacing=[4.0, 4.0, 5.0], kind="btcv", with_label=True),
    dict(seed=11, shape=[96, 96], spacing=[4.0, 4.0, 5.0], kind="tcia", with_label=True),
    dict(seed=6, shape=[48, 40], spacing=[3.0, 3.0, 5.0], kind="btcv", with_label=True),  # nx != ny
    # tiny field of view: organs outside the volume, so the enlarge / force retries run (seed 5 forces one)
    *(dict(seed=s, shape=[16, 16], spacing=[6.0, 6.0, 8.0], kind="btcv", with_label=True) for s in (3, 5)),
    # chest CT (the default unlabeled cohort): one with opacities, one without, one at a finer grid
    *(dict(seed=s, shape=[64, 64], spacing=[6.0, 6.0, 8.0], kind="chest", with_label=False) for s in (0, 1)),
    dict(seed=2, shape=[96, 80], spacing=[4.0, 4.0, 5.0], kind="chest", with_label=False),
]
GOLDEN_COHORT = dict(
    n_unlabeled=2,
    n_unlabeled_val=1,
    n_labeled_train=2,
    n_labeled_val=1,
    train_sizes=[1, 2],
    shape=[64, 64],
    spacing=[6.0, 6.0, 8.0],
    seed=3,
)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _array_record(a: np.ndarray) -> dict:
    return {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _sha(a)}


def _subject_record(case: dict) -> dict:
    img, lab, aff = generate_subject(
        case["seed"], tuple(case["shape"]), tuple(case["spacing"]), with_label=case["with_label"], kind=case["kind"]
    )
    return {
        "case": case,
        "image": _array_record(img),
        "label": None if lab is None else _array_record(lab),
        "affine": _array_record(aff),
    }


def _cohort_record(root: Path) -> dict:
    """Data arrays and affines of every NIfTI (not the gzip bytes) and every JSON; the datalists' ``labels``
    map (organ names, not pixels) is left out and checked against ssl_utils.organs separately."""
    make_synthetic_dataset(root, progress=False, **{**GOLDEN_COHORT, "train_sizes": tuple(GOLDEN_COHORT["train_sizes"])})
    files: dict[str, Any] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.endswith(".nii.gz"):
            im = nib.load(str(path))
            files[rel] = {"data": _array_record(np.asanyarray(im.dataobj)), "affine": _array_record(im.affine)}
        elif rel.endswith(".json"):
            obj = json.loads(path.read_text())
            if isinstance(obj, dict):
                obj.pop("labels", None)
            files[rel] = {"json": obj}
        else:
            files[rel] = {"other": True}
    return {"params": GOLDEN_COHORT, "files": files}


def _golden_records() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cohort = _cohort_record(Path(tmp) / "cohort")
    return {"subjects": [_subject_record(c) for c in GOLDEN_SUBJECTS], "cohort": cohort}


@lru_cache(maxsize=None)
def _subject(seed: int, kind: str = "btcv"):
    return generate_subject(seed, SHAPE, SPACING, kind=kind)


# ------------------------------------------------------------------------------------------------
# generate_subject
# ------------------------------------------------------------------------------------------------
def test_bit_identical_to_golden_reference():
    """Every RNG draw, primitive and painting order is pinned: any change of the output shows up here."""
    golden = json.loads(GOLDEN_PATH.read_text())
    assert [g["case"] for g in golden["subjects"]] == GOLDEN_SUBJECTS, "golden cases out of date"
    for want in golden["subjects"]:
        got = _subject_record(want["case"])
        assert got == want, f"generate_subject differs from the golden reference for {want['case']}"
    assert golden["cohort"]["params"] == GOLDEN_COHORT
    with tempfile.TemporaryDirectory() as tmp:
        got = _cohort_record(Path(tmp) / "cohort")
    assert sorted(got["files"]) == sorted(golden["cohort"]["files"])
    for rel, want in golden["cohort"]["files"].items():
        assert got["files"][rel] == want, f"make_synthetic_dataset: {rel} differs from the golden reference"


def test_organs_reexported_from_shared_table():
    import ssl_utils.organs as organs

    assert synthetic.ORGANS is organs.ORGANS
    assert "ORGANS" in synthetic.__all__


def test_same_seed_same_subject_and_different_seed_differs():
    a = generate_subject(3, SHAPE, SPACING)
    b = generate_subject(3, SHAPE, SPACING)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    c = generate_subject(4, SHAPE, SPACING)
    assert a[0].shape != c[0].shape or a[0].tobytes() != c[0].tobytes()
    assert a[1].shape != c[1].shape or a[1].tobytes() != c[1].tobytes()


def test_output_types_and_geometry():
    for seed in range(5):
        img, lab, aff = _subject(seed)
        assert img.dtype == np.int16 and lab.dtype == np.uint8 and aff.dtype == np.float64
        assert img.ndim == 3 and img.shape == lab.shape and img.shape[:2] == SHAPE
        assert img.min() >= -1024 and img.max() <= 3071
        assert aff.shape == (4, 4) and np.allclose(aff[:3, :3], np.diag(np.diag(aff[:3, :3])))
        sx, sy, sz = np.diag(aff)[:3]
        assert sx > 0 and sy > 0 and sz > 0
        assert abs(sx / SPACING[0] - 1) <= 0.1 + 1e-9 and abs(sy / SPACING[1] - 1) <= 0.1 + 1e-9
        assert sz == pytest.approx(SPACING[2])
        assert 190 <= img.shape[2] * sz <= 330  # z field of view, mm
    n_slices = {_subject(s)[0].shape[2] for s in range(5)}
    assert len(n_slices) > 1  # the number of slices varies across subjects


def test_unlabeled_variant():
    img, lab, aff = generate_subject(5, SHAPE, SPACING, with_label=False, kind="tcia")
    assert lab is None and img.dtype == np.int16 and img.ndim == 3
    with pytest.raises(ValueError):
        generate_subject(0, SHAPE, SPACING, kind="mri")


def _lung_share(img: np.ndarray) -> np.ndarray:
    """Per axial slice: the share of the body's cross-section (body outline filled) below -500 HU."""
    body = _body_mask(img)
    low = (img < -500) & body
    return low.sum(axis=(0, 1)) / np.maximum(body.sum(axis=(0, 1)), 1)


def test_chest_subjects_are_chest_ct_with_lungs():
    for seed in range(4):
        img, lab, aff = generate_subject(seed, SHAPE, SPACING, with_label=False, kind="chest")
        assert lab is None and img.dtype == np.int16 and img.shape[:2] == SHAPE
        assert np.allclose(aff[:3, :3], np.diag(np.diag(aff)[:3])) and np.all(np.diag(aff)[:3] > 0)  # RAS+
        assert 200 <= img.shape[2] * SPACING[2] <= 400, "z field of view of a chest CT (mm)"
        share = _lung_share(img)
        lung_slices = share >= 0.25
        assert lung_slices.mean() >= 0.25, f"seed {seed}: lungs in only {lung_slices.mean():.0%} of the slices"
        assert share.max() >= 0.3, f"seed {seed}: at most {share.max():.0%} of a slice is lung"
        k = int(np.argmax(share))
        body = _body_mask(img)[:, :, k]
        low = (img[:, :, k] < -500) & body
        assert np.median(img[:, :, k][low]) < -700, "the low-density region inside the body is aerated lung, not fat"
        # two lungs, one on either side of the midline (air in the trachea aside)
        parts, n = ndimage.label(low)
        sizes = ndimage.sum(low, parts, range(1, n + 1))
        right, left = (ndimage.center_of_mass(parts == i + 1)[0] for i in np.argsort(sizes)[-2:][::-1])
        mid = ndimage.center_of_mass(body)[0]
        assert (right - mid) * (left - mid) < 0, f"seed {seed}: the two largest air regions are on one side"
        assert sizes.max() < 0.7 * low.sum()
        # the lungs lie above the diaphragm: the lowest slices have less lung than the widest one
        assert share[: max(1, img.shape[2] // 10)].mean() < share.max()
        assert np.percentile(img[_body_mask(img)], 99.5) > 300, "ribs, spine, sternum"


def test_chest_subjects_are_deterministic_per_seed_and_vary():
    a = generate_subject(3, SHAPE, SPACING, with_label=False, kind="chest")
    b = generate_subject(3, SHAPE, SPACING, with_label=False, kind="chest")
    assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[2], b[2])
    others = [generate_subject(s, SHAPE, SPACING, with_label=False, kind="chest")[0] for s in (4, 5)]
    assert all(o.shape != a[0].shape or o.tobytes() != a[0].tobytes() for o in others)
    with pytest.raises(ValueError, match="no labels"):
        generate_subject(0, SHAPE, SPACING, kind="chest")


def test_unlabeled_kind_of_the_cohort(tmp_path):
    """chest (the default) or abdomen; the abdominal option writes what the "tcia" renderer paints, and a
    cohort of the other kind is regenerated, not reused."""
    small = dict(SMALL, n_unlabeled=2, n_unlabeled_val=1, n_labeled_train=1, n_labeled_val=1, train_sizes=(1,))
    chest = make_synthetic_dataset(tmp_path, seed=2, **small)
    vol = tmp_path / "tcia" / json.loads(Path(chest["tcia_json"]).read_text())["training"][0]["image"]
    assert _lung_share(np.asanyarray(nib.load(str(vol)).dataobj)).max() >= 0.3
    abdomen = make_synthetic_dataset(tmp_path, seed=2, unlabeled_kind="abdomen", **small)
    assert not abdomen.get("reused")
    assert json.loads((tmp_path / "cohort.json").read_text())["unlabeled_kind"] == "abdomen"
    with pytest.raises(ValueError, match="unlabeled_kind"):
        make_synthetic_dataset(tmp_path / "x", unlabeled_kind="brain", **small)


def test_every_organ_present_in_every_labeled_subject():
    for seed in range(10):
        _, lab, _ = _subject(seed)
        values = set(np.unique(lab).tolist())
        assert values <= set(range(14)), values
        counts = np.bincount(lab.ravel(), minlength=14)
        missing = [ORGANS[k] for k in range(1, 14) if counts[k] < 10]
        assert not missing, f"seed {seed}: organs with < 10 voxels: {missing}"


def test_anatomical_sides_and_order():
    # RAS+: X grows to the patient's right, Y anterior, Z superior
    for seed in range(3):
        _, lab, _ = _subject(seed)
        com = {k: np.array(ndimage.center_of_mass(lab == k)) for k in (1, 2, 3, 5, 6, 8, 9, 11)}
        assert com[6][0] > com[1][0]  # liver on the patient's right of the spleen
        assert com[2][0] > com[3][0]  # right kidney / left kidney
        assert com[9][0] > com[8][0]  # IVC right of the aorta
        assert com[5][2] > com[2][2] and com[5][2] > com[3][2]  # oesophagus above the kidneys
        assert com[11][1] > com[8][1]  # pancreas anterior to the aorta


def _body_mask(img: np.ndarray) -> np.ndarray:
    body = np.zeros(img.shape, dtype=bool)
    for k in range(img.shape[2]):
        body[:, :, k] = ndimage.binary_fill_holes(img[:, :, k] > -500)
    return body


def test_hounsfield_realism():
    plane = np.ones((3, 3, 1), dtype=bool)
    for seed in range(6):
        img, lab, _ = _subject(seed)
        img = img.astype(np.float64)
        body = _body_mask(img)
        outside = ~ndimage.binary_dilation(body, structure=plane, iterations=2)
        assert img[outside].mean() < -900, "air outside the body"
        # the outer layer just under the skin is subcutaneous fat
        inner = ndimage.binary_erosion(body, structure=plane)
        shell = inner & ~ndimage.binary_erosion(inner, structure=plane) & (lab == 0)
        assert np.median(img[shell]) < -50, "subcutaneous fat"
        mean = {k: img[lab == k].mean() for k in range(1, 14)}
        assert 80 <= mean[6] <= 140, f"liver {mean[6]:.1f} HU"
        assert abs(mean[6] - mean[1]) < 25, "liver and spleen must overlap in HU"
        assert mean[8] > mean[6], "aorta brighter than liver"
        assert mean[4] < mean[6] - 40, "gallbladder (bile) darker than liver"
        # no single HU threshold separates liver from spleen: their central ranges overlap
        lo = max(np.percentile(img[lab == 6], 25), np.percentile(img[lab == 1], 25))
        hi = min(np.percentile(img[lab == 6], 75), np.percentile(img[lab == 1], 75))
        assert lo < hi
        # bone is present and bright
        assert np.percentile(img[body], 99.5) > 300


# ------------------------------------------------------------------------------------------------
# make_synthetic_dataset
# ------------------------------------------------------------------------------------------------
def _check_nifti(path: Path, dtype) -> nib.Nifti1Image:
    im = nib.load(str(path))
    data = np.asanyarray(im.dataobj)
    assert data.ndim == 3 and data.dtype == dtype
    aff = im.affine
    assert np.all(np.diag(aff)[:3] > 0) and np.allclose(aff[:3, :3], np.diag(np.diag(aff)[:3]))
    zooms = im.header.get_zooms()
    assert np.allclose(zooms, np.diag(aff)[:3], rtol=1e-5)
    assert zooms[2] > 1.2 * zooms[0]  # anisotropic (thick slices)
    return im


def test_dataset_layout_and_datalists(tmp_path):
    out = make_synthetic_dataset(tmp_path / "c", seed=1, **SMALL)
    root = Path(out["root"])
    assert out["reused"] is False
    assert Path(out["tcia_root"]) == root / "tcia" and Path(out["btcv_root"]) == root / "btcv"
    assert set(out["btcv_json"]) == {1, 2}

    split = json.loads(Path(out["tcia_json"]).read_text())
    assert Path(out["tcia_json"]) == root / "tcia" / "dataset_split.json"
    assert [e["image"] for e in split["training"]] == ["data/volume-synth-0000.nii.gz"]
    assert [e["image"] for e in split["validation"]] == ["data/volume-synth-0001.nii.gz"]
    for e in split["training"] + split["validation"]:
        assert set(e) == {"image"}
        _check_nifti(root / "tcia" / e["image"], np.int16)

    lists = {n: json.loads(Path(p).read_text()) for n, p in out["btcv_json"].items()}
    assert Path(out["btcv_json"][2]) == root / "btcv" / "dataset_0_init_2.json"
    for n, d in lists.items():
        assert d["description"] == "synthetic btcv-like cohort"
        assert d["labels"] == {"0": "background", **{str(k): v for k, v in ORGANS.items()}}
        assert d["modality"] == {"0": "CT"}
        assert len(d["training"]) == n
        assert d["training"] == lists[2]["training"][:n]  # nested subsets
        assert d["validation"] == lists[2]["validation"]  # shared validation list
    assert [e["image"] for e in lists[2]["training"]] == [f"imagesTr/img{j:04d}.nii.gz" for j in (1, 2)]
    assert [e["label"] for e in lists[2]["training"]] == [f"labelsTr/label{j:04d}.nii.gz" for j in (1, 2)]
    assert [e["image"] for e in lists[2]["validation"]] == ["imagesTr/img0003.nii.gz"]
    for e in lists[2]["training"] + lists[2]["validation"]:
        im = _check_nifti(root / "btcv" / e["image"], np.int16)
        lb = _check_nifti(root / "btcv" / e["label"], np.uint8)
        assert im.shape == lb.shape and np.allclose(im.affine, lb.affine)
        lab = np.asanyarray(lb.dataobj)
        assert set(np.unique(lab).tolist()) == set(range(14))

    meta = json.loads((root / "cohort.json").read_text())
    assert meta["version"] == 1 and meta["seed"] == 1 and meta["shape"] == list(SHAPE) and meta["complete"] is True
    assert not list(root.rglob(".tmp-*")), "temporary files left behind"
    # unlabeled and labeled subjects come from distinct seed streams
    a = np.asanyarray(nib.load(str(root / "tcia" / split["training"][0]["image"])).dataobj)
    b = np.asanyarray(nib.load(str(root / "btcv" / lists[2]["training"][0]["image"])).dataobj)
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_reuse_and_regeneration(tmp_path):
    small = {**SMALL, "n_labeled_train": 1, "train_sizes": (1,)}
    root = tmp_path / "cohort"
    first = make_synthetic_dataset(root, seed=0, **small)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    keep = root / "notes.txt"
    keep.write_text("not part of the cohort")

    again = make_synthetic_dataset(root, seed=0, **small)
    assert again["reused"] is True and again["btcv_json"] == first["btcv_json"]
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes  # nothing rewritten

    img0 = (root / "tcia" / "data" / "volume-synth-0000.nii.gz").read_bytes()
    other = make_synthetic_dataset(root, seed=7, **small)
    assert other["reused"] is False
    assert (root / "tcia" / "data" / "volume-synth-0000.nii.gz").read_bytes() != img0
    assert json.loads((root / "cohort.json").read_text())["seed"] == 7
    assert keep.exists(), "files outside tcia/ and btcv/ must survive regeneration"

    # a missing file triggers regeneration; overwrite=True forces it
    (root / "btcv" / "labelsTr" / "label0001.nii.gz").unlink()
    assert make_synthetic_dataset(root, seed=7, **small)["reused"] is False
    assert (root / "btcv" / "labelsTr" / "label0001.nii.gz").exists()
    assert (root / "tcia" / "data" / "volume-synth-0000.nii.gz").read_bytes() != img0
    assert make_synthetic_dataset(root, seed=7, overwrite=True, **small)["reused"] is False
    # an interrupted generation (cohort.json not marked complete) is redone
    meta = json.loads((root / "cohort.json").read_text())
    (root / "cohort.json").write_text(json.dumps({**meta, "complete": False}))
    assert make_synthetic_dataset(root, seed=7, **small)["reused"] is False
    assert make_synthetic_dataset(root, seed=7, **small)["reused"] is True


def test_make_cohort_from_config(tmp_path):
    cfg = {
        "synth_unlabeled": 3,
        "synth_unlabeled_val": 1,
        "synth_labeled_train": 2,
        "synth_labeled_val": 1,
        "synth_train_sizes": (1, 2),
        "synth_shape": SHAPE,
        "synth_spacing": SPACING,
        "synth_seed": 5,
    }
    out = make_cohort_from_config(cfg, tmp_path, progress=False)
    assert set(out["btcv_json"]) == {1, 2}
    split = json.loads(Path(out["tcia_json"]).read_text())
    assert len(split["training"]) == 2 and len(split["validation"]) == 1
    meta = json.loads((tmp_path / "cohort.json").read_text())
    assert meta["seed"] == 5 and meta["n_unlabeled"] == 3 and meta["spacing"] == list(SPACING)
    assert make_cohort_from_config(cfg, tmp_path, progress=False)["reused"] is True


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path, n_unlabeled=2, n_unlabeled_val=2, progress=False)
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path, n_labeled_train=2, train_sizes=(3,), progress=False)
    assert not os.listdir(tmp_path)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-golden"]:
        sys.exit("usage: python tests/test_synthetic.py --write-golden")
    GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN_PATH.write_text(json.dumps(_golden_records(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN_PATH}")
