"""The data pipeline on real files: transforms (recipe and behaviour), cohort, caching, datalists."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as T

from ssl_utils import get_config
from ssl_utils.data import DatalistError, load_checked_datalist, load_datalist, preflight_datalist
from ssl_utils.datasets import SeededCacheDataset, pretrain_datasets
from ssl_utils.transforms import finetune_transforms, pretrain_deterministic, pretrain_transforms


def _entries(json_path: str, root: str, key: str, label: bool = False) -> list[dict]:
    return load_datalist(json_path, root, key=key, require_label=label)


# --------------------------------------------------------------------------------------------
# the paper preset is the reference recipe, argument for argument
# --------------------------------------------------------------------------------------------


def _types(compose: T.Compose) -> list[str]:
    return [type(t).__name__ for t in compose.transforms]


def test_paper_pretrain_transforms_match_reference():
    tf = pretrain_transforms(get_config("paper"))
    assert _types(tf) == [
        "LoadImaged", "EnsureChannelFirstd", "Spacingd", "ScaleIntensityRanged", "CropForegroundd",
        "SpatialPadd", "RandSpatialCropSamplesd", "CopyItemsd",
        "OneOf", "RandCoarseShuffled", "OneOf", "RandCoarseShuffled",
    ]
    _, _, spacing, scale, crop, pad, samples, copy, one_1, shuffle_1, one_2, shuffle_2 = tf.transforms
    assert spacing.spacing_transform.pixdim.tolist() == [2.0, 2.0, 2.0]
    assert tuple(spacing.mode) == ("bilinear",)
    s = scale.scaler
    assert (s.a_min, s.a_max, s.b_min, s.b_max, s.clip) == (-57.0, 164.0, 0.0, 1.0, True)
    assert crop.source_key == "image" and crop.cropper.allow_smaller is True
    assert tuple(pad.padder.spatial_size) == (96, 96, 96)
    assert samples.cropper.num_samples == 2
    assert tuple(samples.cropper.cropper.roi_size) == (96, 96, 96)
    assert samples.cropper.cropper.random_size is False
    assert copy.times == 2 and tuple(copy.names) == ("gt_image", "image_2") and tuple(copy.keys) == ("image",)
    # one corruption chain per view: a single call for both keys would corrupt them identically
    for key, one_of, shuffle in (("image", one_1, shuffle_1), ("image_2", one_2, shuffle_2)):
        inpaint, outpaint = one_of.transforms
        for t in (inpaint, outpaint, shuffle):
            assert tuple(t.keys) == (key,)
        assert list(one_of.weights) == [0.5, 0.5]
        d = inpaint.dropper
        assert (inpaint.prob, d.holes, d.spatial_size, d.max_spatial_size, d.dropout_holes) == (1.0, 6, 5, 32, True)
        d = outpaint.dropper
        assert (outpaint.prob, d.holes, d.spatial_size, d.max_spatial_size, d.dropout_holes) == (1.0, 6, 20, 64, False)
        assert (shuffle.prob, shuffle.shuffle.holes, shuffle.shuffle.spatial_size) == (0.8, 10, 8)
    assert one_1 is not one_2 and one_1.transforms[0] is not one_2.transforms[0]


def test_paper_finetune_transforms_match_reference():
    cfg = get_config("paper")
    train = finetune_transforms(cfg, train=True)
    assert _types(train) == [
        "LoadImaged", "EnsureChannelFirstd", "Orientationd", "Spacingd", "ScaleIntensityRanged",
        "CropForegroundd", "SpatialPadd", "RandCropByPosNegLabeld",
        "RandFlipd", "RandFlipd", "RandFlipd", "RandRotate90d", "RandShiftIntensityd",
    ]
    _, _, orient, spacing, scale, crop, pad, pos_neg, flip0, flip1, flip2, rot, shift = train.transforms
    assert orient.ornt_transform.axcodes == "RAS"
    assert spacing.spacing_transform.pixdim.tolist() == [1.5, 1.5, 2.0]
    assert tuple(spacing.mode) == ("bilinear", "nearest") and tuple(spacing.keys) == ("image", "label")
    s = scale.scaler
    assert (s.a_min, s.a_max, s.b_min, s.b_max, s.clip) == (-175.0, 250.0, 0.0, 1.0, True)
    assert crop.source_key == "image" and tuple(crop.keys) == ("image", "label")
    assert tuple(pad.padder.spatial_size) == (96, 96, 96)  # a no-op on volumes larger than the ROI
    c = pos_neg.cropper
    assert tuple(c.spatial_size) == (96, 96, 96) and c.num_samples == 4 and c.pos_ratio == 0.5  # pos 1, neg 1
    assert pos_neg.label_key == "label" and pos_neg.image_key == "image" and c.image_threshold == 0
    for axis, flip in enumerate((flip0, flip1, flip2)):
        assert flip.prob == 0.1 and list(flip.flipper.spatial_axis) == [axis]
    assert (rot.prob, rot.max_k) == (0.1, 3)
    assert shift.prob == 0.5 and tuple(shift.shifter.offsets) == (-0.1, 0.1) and tuple(shift.keys) == ("image",)
    # validation: the deterministic stage only
    val = finetune_transforms(cfg, train=False)
    assert _types(val) == _types(train)[:6]
    assert not any(isinstance(t, T.Randomizable) for t in val.transforms)


# --------------------------------------------------------------------------------------------
# behaviour of the pre-training chain on a generated volume
# --------------------------------------------------------------------------------------------


def test_two_views_differ_and_gt_is_the_clean_crop(smoke_cohort):
    cfg = get_config("smoke")
    entry = _entries(smoke_cohort["tcia_json"], smoke_cohort["tcia_root"], "training")[0]
    clean = T.Compose(pretrain_deterministic(cfg))(dict(entry))["image"]
    tf = pretrain_transforms(cfg)
    tf.set_random_state(seed=7)
    crops = tf(dict(entry))
    assert len(crops) == cfg["ssl_num_samples"]
    roi = cfg["roi"]
    starts = set()
    for crop in crops:
        gt, v1, v2 = crop["gt_image"], crop["image"], crop["image_2"]
        assert gt.shape == v1.shape == v2.shape == (1, roi, roi, roi)
        assert not torch.equal(v1, v2), "the two views must be corrupted independently"
        assert not torch.equal(v1, gt) and not torch.equal(v2, gt)
        # gt_image is the un-augmented crop: a block of the deterministic stage's output, found at the
        # offset MONAI records for the random crop
        op = next(o for o in reversed(gt.applied_operations) if o["class"] == "RandSpatialCropSamples")
        cropped = op["extra_info"]["extra_info"]["cropped"]
        x, y, z = cropped[0::2]
        starts.add((x, y, z))
        torch.testing.assert_close(gt.as_tensor(), clean.as_tensor()[:, x : x + roi, y : y + roi, z : z + roi], rtol=0, atol=0)
        assert 0.0 <= float(v1.min()) and float(v1.max()) <= 1.0 + 1e-6
    assert any(s > roi for s in clean.shape[1:]), "the check needs a volume larger than the ROI"


# --------------------------------------------------------------------------------------------
# the generated cohort
# --------------------------------------------------------------------------------------------


def _tiny_cohort(root, seed):
    from ssl_utils.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(
        root, n_unlabeled=2, n_unlabeled_val=1, n_labeled_train=1, n_labeled_val=0, train_sizes=(1,),
        shape=(24, 24), spacing=(12.0, 12.0, 16.0), seed=seed, progress=False,
    )


def _volumes(info) -> list[np.ndarray]:
    paths = []
    for key in ("training", "validation"):
        paths += [e["image"] for e in _entries(info["tcia_json"], info["tcia_root"], key)]
    for e in _entries(info["btcv_json"][1], info["btcv_root"], "training", label=True):
        paths += [e["image"], e["label"]]
    return [np.asanyarray(nib.load(p).dataobj) for p in paths]


def test_cohort_is_a_function_of_the_seed(tmp_path):
    a, b, c = (_volumes(_tiny_cohort(tmp_path / name, seed)) for name, seed in (("a", 5), ("b", 5), ("c", 6)))
    assert len(a) == len(b) == len(c) == 4
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for x, z in zip(a, c):
        assert x.shape != z.shape or not np.array_equal(x, z)


def test_labels_are_btcv_organs_all_present(smoke_cohort):
    for N, json_path in smoke_cohort["btcv_json"].items():
        for key in ("training", "validation"):
            for e in _entries(json_path, smoke_cohort["btcv_root"], key, label=True):
                img, lab = nib.load(e["image"]), nib.load(e["label"])
                values = np.asanyarray(lab.dataobj)
                assert np.issubdtype(values.dtype, np.integer), e["label"]
                assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
                assert set(np.unique(values).tolist()) == set(range(14)), f"{e['label']}: not every organ present"


# --------------------------------------------------------------------------------------------
# datasets: fixed validation views, per-epoch training views, cached deterministic stage
# --------------------------------------------------------------------------------------------


def _stack(items) -> torch.Tensor:
    return torch.stack([torch.stack([c["image"], c["image_2"], c["gt_image"]]) for c in items])


def test_validation_views_fixed_training_views_change(smoke_cohort):
    cfg = get_config("smoke")
    js, root = smoke_cohort["tcia_json"], smoke_cohort["tcia_root"]
    train, val = pretrain_datasets(cfg, _entries(js, root, "training")[:2], _entries(js, root, "validation"), progress=False)
    first = [_stack(val[i]) for i in range(len(val))]
    second = [_stack(val[i]) for i in range(len(val))]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # a new dataset with the same validation seed (another run) sees the same views
    _, again = pretrain_datasets(cfg, _entries(js, root, "training")[:1], _entries(js, root, "validation"), progress=False)
    assert torch.equal(_stack(again[0]), first[0])

    train.set_epoch(1)
    e1 = _stack(train[0])
    train.set_epoch(2)
    e2 = _stack(train[0])
    train.set_epoch(1)
    e1_again = _stack(train[0])
    assert not torch.equal(e1, e2), "training views must change from epoch to epoch"
    assert torch.equal(e1, e1_again), "training views must be a function of (seed, epoch, index)"


def test_deterministic_stage_is_cached(smoke_cohort, tmp_path):
    cfg = get_config("smoke")
    entries = _entries(smoke_cohort["tcia_json"], smoke_cohort["tcia_root"], "training")[:2]
    copies = []
    for i, e in enumerate(entries):
        dst = tmp_path / f"v{i}.nii.gz"
        shutil.copy(e["image"], dst)
        copies.append({"image": str(dst)})
    ds = SeededCacheDataset(copies, pretrain_transforms(cfg), seed=1, cache_rate=1.0)
    for c in copies:
        os.remove(c["image"])
    for epoch in (1, 2):  # the random stage still runs on the cached arrays, epoch after epoch
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            crops = ds[i]
            assert len(crops) == cfg["ssl_num_samples"]
            assert crops[0]["image"].shape == (1, cfg["roi"], cfg["roi"], cfg["roi"])
    with pytest.raises(Exception):  # the files really are gone: only the cache could serve them
        SeededCacheDataset(copies, pretrain_transforms(cfg), seed=1, cache_rate=1.0)


# --------------------------------------------------------------------------------------------
# bad datalists: one clear error naming the datalist, the entry, the resolved path and the problem
# --------------------------------------------------------------------------------------------


def _save(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.diag([6.0, 6.0, 8.0, 1.0]) if affine is None else affine), str(path))


def _body(shape=(20, 20, 12)) -> np.ndarray:
    vol = np.full(shape, -1000, np.int16)
    vol[3:-3, 3:-3, 2:-2] = 40  # soft tissue inside air
    return vol


@pytest.fixture()
def small_data(tmp_path):
    """A labeled folder with two good subjects: imagesTr/img{0,1}.nii.gz, labelsTr/label{0,1}.nii.gz."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for i in range(2):
        _save(tmp_path / f"imagesTr/img{i}.nii.gz", _body())
        lab = np.zeros((20, 20, 12), np.uint8)
        lab[5:10, 5:10, 3:6] = 1 + i
        _save(tmp_path / f"labelsTr/label{i}.nii.gz", lab)
    return tmp_path


def _good(i: int) -> dict:
    return {"image": f"imagesTr/img{i}.nii.gz", "label": f"labelsTr/label{i}.nii.gz"}


def test_load_checked_datalist_names_the_entry_and_counts(small_data):
    """The checked loader for one key (what the notebook calls). The individual problems (missing,
    unreadable, non-3D, label mismatch, bad JSON or keys) go through ``pretrain`` / ``finetune`` in
    test_reliability.py."""
    json_path = small_data / "dataset.json"
    entries = [_good(0), {"image": "imagesTr/nope.nii.gz", "label": "labelsTr/label1.nii.gz"}]
    json_path.write_text(json.dumps({"training": entries, "validation": [_good(1)]}))
    with pytest.raises(DatalistError) as info:
        load_checked_datalist(json_path, small_data, "training", require_label=True, num_classes=14, progress=False)
    msg = str(info.value)
    assert str(json_path) in msg and "training entry 1:" in msg and "1 of 2 entries" in msg, msg
    assert f"{small_data / 'imagesTr/nope.nii.gz'}): file not found" in msg, msg
    good = load_checked_datalist(json_path, small_data, "validation", require_label=True, num_classes=14, progress=False)
    assert good == [{"image": str(small_data / "imagesTr/img1.nii.gz"), "label": str(small_data / "labelsTr/label1.nii.gz")}]


def test_good_datalist_resolves_relative_to_data_root(small_data):
    (small_data / "lists").mkdir()
    json_path = small_data / "lists" / "dataset.json"
    json_path.write_text(json.dumps({"training": [_good(0)], "validation": [_good(1)]}))
    out = preflight_datalist(json_path, small_data, require_label=True, num_classes=14, progress=False)
    assert out["training"] == [{"image": str(small_data / "imagesTr/img0.nii.gz"), "label": str(small_data / "labelsTr/label0.nii.gz")}]
    assert len(out["validation"]) == 1
    with pytest.raises(DatalistError, match="file not found"):  # default root: the JSON's folder
        preflight_datalist(json_path, None, require_label=True, progress=False)
