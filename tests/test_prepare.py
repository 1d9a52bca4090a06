"""``ssl_utils.prepare``: DICOM series (written with pydicom), NRRD, MetaImage and NIfTI in, RAS
NIfTI and a checked datalist out; every bad input reported together before anything is written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ssl_utils.data import preflight_datalist
from ssl_utils.prepare import PrepareError, main, prepare_dataset, read_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (12, 10, 7)  # RAS voxel axes of the reference volume
SPACING = (0.8, 0.7, 2.5)  # mm
ORIGIN = (-5.0, 10.0, -30.0)  # mm, RAS world position of voxel (0, 0, 0)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def reference_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An int16 HU volume ``[x, y, z]`` in RAS voxel order and its RAS affine (mm)."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1024, 2000, size=SHAPE).astype(np.int16)
    hu[0, 0, 0], hu[-1, -1, -1] = -1024, 1999  # the corners pin the orientation
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = ORIGIN
    return hu, affine


def reordered(hu: np.ndarray, affine: np.ndarray, ornt) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels with their axes permuted / flipped by ``ornt`` and the matching RAS affine."""
    ornt = np.asarray(ornt, dtype=float)
    data = nib.orientations.apply_orientation(hu, ornt)
    return data, affine @ nib.orientations.inv_ornt_aff(ornt, hu.shape)


# voxel axes of a DICOM series [column, row, slice] relative to the RAS reference volume
AXIAL_LPS = [[0, -1], [1, -1], [2, 1]]  # the usual axial series: IOP (1,0,0, 0,1,0), z ascending
AXIAL_DESCENDING = [[0, 1], [1, 1], [2, -1]]  # IOP (-1,0,0, 0,-1,0), slices from head to feet
CORONAL = [[0, -1], [2, -1], [1, -1]]  # IOP (1,0,0, 0,0,-1): slices along anterior-posterior


def write_dicom_series(folder: Path, hu: np.ndarray, affine: np.ndarray, ornt=AXIAL_LPS, *, modality="CT",
                       image_type=("ORIGINAL", "PRIMARY", "AXIAL"), file_order=None, series_uid=None,
                       positions=None, drop=(), intercept=-1024.0) -> list[Path]:
    """One DICOM file per slice (pydicom, explicit VR little endian), stored value = HU - intercept
    (uint16), RescaleIntercept ``intercept``; ``file_order`` renames files (slice k -> name index)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    data, ras = reordered(hu, affine, ornt)
    lps = LPS @ ras
    row_dir, col_dir = lps[:3, 0] / np.linalg.norm(lps[:3, 0]), lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), series_uid or generate_uid()
    n = data.shape[2]
    order = list(file_order) if file_order is not None else list(range(n))
    paths = []
    for k in range(n):
        if k in drop:
            continue
        ipp = (lps @ np.array([0.0, 0.0, k, 1.0]))[:3] if positions is None else positions[k]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.ImageType = modality, list(image_type)
        ds.PatientID, ds.InstanceNumber = "TEST", order[k] + 1
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.PixelSpacing = [float(np.linalg.norm(lps[:3, 1])), float(np.linalg.norm(lps[:3, 0]))]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, intercept
        stored = (data[:, :, k].astype(np.float64) - intercept).T  # [rows, columns]
        ds.PixelData = stored.astype("<u2").tobytes()
        path = folder / f"IM{order[k]:04d}"
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def write_nrrd(path: Path, hu: np.ndarray, affine: np.ndarray, ornt=AXIAL_LPS) -> None:
    """NRRD in LPS space (pynrrd), voxels stored in the DICOM-like axis order ``ornt``."""
    import nrrd

    data, ras = reordered(hu, affine, ornt)
    lps = LPS @ ras
    nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": lps[:3, :3].T,
                                 "space origin": lps[:3, 3]})


def write_metaimage(path: Path, hu: np.ndarray, affine: np.ndarray, ornt=AXIAL_LPS) -> None:
    """MetaImage (``.mha``: header + data; ``.mhd``: header + ``.raw``), ITK's LPS convention."""
    data, ras = reordered(hu, affine, ornt)
    lps = LPS @ ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = (lps[:3, :3] / spacing).T  # row i: the direction of voxel axis i
    raw = np.asarray(data, dtype="<i2").tobytes(order="F")  # x fastest
    local = path.suffix == ".mha"
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = False\n"
        f"TransformMatrix = {' '.join(f'{v:g}' for v in direction.ravel())}\n"
        f"Offset = {' '.join(f'{v:g}' for v in lps[:3, 3])}\nAnatomicalOrientation = RAI\n"
        f"ElementSpacing = {' '.join(f'{v:g}' for v in spacing)}\nDimSize = {' '.join(map(str, data.shape))}\n"
        f"ElementType = MET_SHORT\nElementDataFile = {'LOCAL' if local else path.stem + '.raw'}\n"
    )
    if local:
        path.write_bytes(header.encode() + raw)
    else:
        path.write_text(header)
        (path.parent / (path.stem + ".raw")).write_bytes(raw)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_every_format_reads_back_to_the_same_hu_and_ras_affine(tmp_path):
    hu, affine = reference_volume()
    src = tmp_path / "in"
    src.mkdir()
    nib.save(nib.Nifti1Image(hu, affine), str(src / "direct.nii.gz"))
    write_dicom_series(src / "patient1" / "axial", hu, affine, AXIAL_LPS, file_order=[3, 0, 6, 1, 5, 2, 4])
    write_dicom_series(src / "patient1" / "descending", hu, affine, AXIAL_DESCENDING)
    write_dicom_series(src / "patient2" / "coronal", hu, affine, CORONAL, file_order=list(range(SHAPE[1]))[::-1])
    write_nrrd(src / "scan_nrrd.nrrd", hu, affine)
    write_metaimage(src / "scan_mha.mha", hu, affine)
    write_metaimage(src / "scan_mhd.mhd", hu, affine, AXIAL_DESCENDING)
    (src / "notes.txt").write_text("not an image")
    before = tree_digest(src)
    lines: list[str] = []
    res = prepare_dataset(src, tmp_path / "out", val_fraction=0.3, seed=1, progress=False, log=lines.append)
    assert tree_digest(src) == before  # inputs untouched
    cases = {r["case"]: r for r in res.rows}
    # a series is named by the shortest part of its folder path no other series shares
    assert set(cases) == {"direct", "patient1_axial", "patient1_descending", "patient2", "scan_nrrd", "scan_mha",
                          "scan_mhd"}
    assert {cases["patient1_axial"]["kind"], cases["scan_nrrd"]["kind"], cases["scan_mha"]["kind"]} == {
        "dicom", "nrrd", "metaimage"}
    datalist = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert len(datalist["validation"]) == 2 and len(datalist["training"]) == 5
    assert "labels" not in datalist
    for entry in datalist["training"] + datalist["validation"]:
        img = nib.load(str(tmp_path / "out" / entry["image"]))
        assert entry["image"].startswith("data/")
        assert img.get_data_dtype() == np.int16
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(img.affine, affine, atol=1e-4, err_msg=entry["image"])
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), hu, err_msg=entry["image"])
    assert preflight_datalist(tmp_path / "out" / "dataset.json", progress=False)["training"]
    text = "\n".join(lines)
    assert "| patient1_axial | dicom |" in text and "12 x 10 x 7" in text and "0.80 x 0.70 x 2.50" in text
    assert "HU: -1024 .. 1999" in text and "pre-flight check passed: 7 volumes" in text
    # a second run on the same input rewrites the same folder
    again = prepare_dataset(src, tmp_path / "out", val_fraction=0.3, seed=1, progress=False, log=lambda _: None)
    assert [r["case"] for r in again.rows] == [r["case"] for r in res.rows]


def test_metaimage_reader_matches_the_written_voxels(tmp_path):
    hu, affine = reference_volume(3)
    write_metaimage(tmp_path / "a.mha", hu, affine, np.array([[0, 1], [1, 1], [2, 1]]))
    data, ras = read_image(tmp_path / "a.mha")
    np.testing.assert_array_equal(data, hu)
    np.testing.assert_allclose(ras, affine)


def _bad_inputs(root: Path) -> dict[str, str]:
    """One input folder holding every kind of bad input; returns {what: path expected in the message}."""
    hu, affine = reference_volume()
    write_dicom_series(root / "missing_slice", hu, affine, drop=(3,))
    lps_z = [ORIGIN[2] + SPACING[2] * k for k in range(SHAPE[2])]
    lps_z[4] += 0.6  # one slice 0.6 mm off its place: steps of 2.5, 3.1 and 1.9 mm
    x0, y0 = -(ORIGIN[0] + (SHAPE[0] - 1) * SPACING[0]), -(ORIGIN[1] + (SHAPE[1] - 1) * SPACING[1])
    write_dicom_series(root / "uneven", hu, affine, positions=[(x0, y0, z) for z in lps_z])
    write_dicom_series(root / "mixed", hu, affine)
    write_dicom_series(root / "mixed", hu, affine, file_order=[10 + k for k in range(SHAPE[2])])
    write_dicom_series(root / "mr", hu, affine, modality="MR")
    write_dicom_series(root / "scout", hu[:, :, :1], affine, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_dicom_series(root / "single", hu[:, :, :1], affine)
    nib.save(nib.Nifti1Image(hu[:, :, 0], affine), str(root / "flat.nii.gz"))
    return {"missing slices": "missing_slice", "uneven slice spacing": "uneven", "2 DICOM series in one folder": "mixed",
            "modality MR, expected CT": "mr", "a localizer (scout) image": "scout",
            "a 2D image (one slice": "single", "a 2D image (shape (12, 10))": "flat.nii.gz"}


def test_bad_inputs_are_listed_together_and_nothing_is_written(tmp_path):
    src = tmp_path / "in"
    expected = _bad_inputs(src)
    hu, affine = reference_volume()
    write_dicom_series(src / "good", hu, affine)
    write_dicom_series(src / "good2", hu, affine)
    before = tree_digest(src)
    with pytest.raises(PrepareError) as err:
        prepare_dataset(src, tmp_path / "out", progress=False, log=lambda _: None)
    message = str(err.value)
    assert f"{len(expected)} problem(s); nothing was written" in message
    lines = message.splitlines()[1:]
    for problem, where in expected.items():
        hits = [line for line in lines if problem in line]
        assert len(hits) == 1, (problem, message)
        assert os.path.join(str(src), where) in hits[0], (problem, hits[0])
    assert "IM0003 and IM0004" in message or "IM0002 and IM0004" in message  # the gap names its neighbours
    assert "good" not in message
    assert not (tmp_path / "out").exists()
    assert tree_digest(src) == before


def test_label_problems_and_an_occupied_output_folder_are_listed_together(tmp_path):
    hu, affine = reference_volume()
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    lab = (hu > 500).astype(np.uint8)
    for name in ("ok", "wrong_shape", "shifted", "extra_value"):
        nib.save(nib.Nifti1Image(hu, affine), str(images / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(lab, affine), str(labels / "ok_seg.nii.gz"))
    nib.save(nib.Nifti1Image(lab[:, :, :-1], affine), str(labels / "wrong_shape.nii.gz"))
    moved = affine.copy()
    moved[0, 3] += 4.0
    nib.save(nib.Nifti1Image(lab, moved), str(labels / "shifted.nii.gz"))
    nib.save(nib.Nifti1Image(lab * 3, affine), str(labels / "extra_value.nii.gz"))
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "lesion"}))
    out = tmp_path / "out"
    other = tmp_path / "other"
    other.mkdir()
    nib.save(nib.Nifti1Image(hu, affine), str(other / "x.nii.gz"))
    nib.save(nib.Nifti1Image(hu, affine), str(other / "y.nii.gz"))
    prepare_dataset(other, out, progress=False, log=lambda _: None)  # out now holds another dataset
    out_before = tree_digest(out)
    with pytest.raises(PrepareError) as err:
        prepare_dataset(images, out, labels, names, progress=False, log=lambda _: None)
    message = str(err.value)
    assert "4 problem(s); nothing was written" in message
    assert f"{labels / 'wrong_shape.nii.gz'}: label map shape (12, 10, 6) differs from its image's (12, 10, 7)" in message
    assert f"{labels / 'shifted.nii.gz'}: label map affine differs from its image's" in message
    assert f"{labels / 'extra_value.nii.gz'}: label values [3] are not in --label-names" in message
    assert f"{out}: already holds a different dataset" in message
    assert tree_digest(out) == out_before


@pytest.mark.slow
def test_labeled_dataset_has_its_own_classes_and_the_command_line_works(tmp_path):
    hu, affine = reference_volume()
    images, labels = tmp_path / "images", tmp_path / "labels"
    write_dicom_series(images / "case1" / "CT_abdomen", hu, affine, AXIAL_DESCENDING)  # patient / series
    write_nrrd(images / "case2.nrrd", hu, affine)
    lab = (hu > 1500).astype(np.uint8)
    labels.mkdir()
    nib.save(nib.Nifti1Image(lab, affine), str(labels / "case1_label.nii.gz"))
    write_nrrd(labels / "case2.nrrd", lab, affine)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"0": "background", "1": "lesion"}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ssl_utils.prepare", "--input", str(images), "--labels", str(labels),
                           "--label-names", str(names), "--out", str(out), "--val-fraction", "0.5", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "label values found: 0 background, 1 lesion" in proc.stdout
    datalist = json.loads((out / "dataset.json").read_text())
    assert datalist["labels"] == {"0": "background", "1": "lesion"}
    for entry in datalist["training"] + datalist["validation"]:
        image, label = nib.load(str(out / entry["image"])), nib.load(str(out / entry["label"]))
        assert entry["image"].startswith("imagesTr/") and entry["label"].startswith("labelsTr/")
        np.testing.assert_array_equal(np.asanyarray(label.dataobj), lab)
        np.testing.assert_allclose(label.affine, image.affine)
    unnamed = prepare_dataset(images, tmp_path / "unnamed", labels, val_fraction=0.5, progress=False,
                              log=lambda _: None)  # no --label-names: the values found, named "class k"
    assert unnamed.labels == {0: "background", 1: "class 1"}
    bad = subprocess.run([sys.executable, "-m", "ssl_utils.prepare", "--input", str(tmp_path / "nowhere"), "--out",
                          str(tmp_path / "o2")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nowhere: not a folder" in bad.stderr
    assert main(["--input", str(images), "--out", str(images / "prepared"), "--no-progress"]) == 2  # out inside input
    assert not (images / "prepared").exists()


def test_help_works():
    proc = subprocess.run([sys.executable, "-m", "ssl_utils.prepare", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--label-names" in proc.stdout and "DICOM" in proc.stdout


@pytest.mark.parametrize("ornt", [AXIAL_LPS, AXIAL_DESCENDING, CORONAL], ids=["axial", "descending", "coronal"])
def test_monai_readers_see_the_written_series_as_prepare_does(tmp_path, ornt):
    """MONAI's own PydicomReader (and NrrdReader) read the test's DICOM series (and NRRD) to the same
    HU voxels and RAS geometry that ``prepare`` writes: the writers above are not wrong in a way
    ``prepare`` shares."""
    import warnings

    from monai.data import NrrdReader, PydicomReader

    hu, affine = reference_volume(2)
    write_dicom_series(tmp_path / "in" / "series", hu, affine, ornt)
    write_nrrd(tmp_path / "in" / "vol.nrrd", hu, affine, ornt)
    prepare_dataset(tmp_path / "in", tmp_path / "out", val_fraction=0.5, progress=False, log=lambda _: None)
    for reader, path, written in ((PydicomReader(), tmp_path / "in" / "series", "series"),
                                  (NrrdReader(), tmp_path / "in" / "vol.nrrd", "vol")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, meta = reader.get_data(reader.read(str(path)))
        monai_affine = np.asarray(meta["affine"], dtype=float)
        ornt_monai = nib.orientations.io_orientation(monai_affine)
        out = nib.load(str(tmp_path / "out" / "data" / f"{written}.nii.gz"))
        np.testing.assert_array_equal(nib.orientations.apply_orientation(np.asarray(data), ornt_monai),
                                      np.asanyarray(out.dataobj))
        np.testing.assert_allclose(monai_affine @ nib.orientations.inv_ornt_aff(ornt_monai, data.shape), out.affine,
                                   atol=1e-4)


def test_a_damaged_file_stops_without_a_datalist_and_the_fixed_input_runs_again(tmp_path):
    from pydicom import dcmread

    hu, affine = reference_volume()
    src, out = tmp_path / "in", tmp_path / "out"
    write_dicom_series(src / "a", hu, affine)
    write_dicom_series(src / "b", hu, affine)
    damaged = src / "b" / "IM0003"
    ds = dcmread(str(damaged))
    ds.PixelData = ds.PixelData[:40]  # headers intact, pixel data cut short
    ds.save_as(str(damaged), enforce_file_format=True)
    with pytest.raises(PrepareError, match=r"1 volume\(s\) could not be converted; dataset.json was not written:\n"
                                           rf"  - {src / 'b'}: voxels cannot be read"):
        prepare_dataset(src, out, progress=False, log=lambda _: None)
    assert not (out / "dataset.json").exists()
    write_dicom_series(src / "b", hu, affine)  # the series exported again, same file names
    res = prepare_dataset(src, out, progress=False, log=lambda _: None)
    assert sorted(r["case"] for r in res.rows) == ["a", "b"]
    assert sorted(p.name for p in out.iterdir()) == ["data", "dataset.json", "prepare_summary.md"]


def test_a_series_whose_pixel_data_cannot_be_decoded_is_refused_before_writing(tmp_path):
    """Pixel data that the header calls JPEG Lossless but that is not a JPEG stream: refused by the
    checks (the first slice is decoded there), named with its transfer syntax, before anything is
    written."""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    hu, affine = reference_volume()
    src = tmp_path / "in"
    for path in write_dicom_series(src / "compressed", hu, affine):
        ds = dcmread(str(path))
        ds.PixelData = encapsulate([ds.PixelData])  # the header says JPEG Lossless; the data is not
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.save_as(str(path), enforce_file_format=True)
    write_dicom_series(src / "plain1", hu, affine)
    write_dicom_series(src / "plain2", hu, affine)
    with pytest.raises(PrepareError, match=r"1 problem\(s\); nothing was written:\n  - .*compressed: pixel data "
                                           r"compressed as JPEG Lossless.* cannot be decoded here \(IM0000: .*"
                                           r"decompress the series first"):
        prepare_dataset(src, tmp_path / "out", progress=False, log=lambda _: None)
    assert not (tmp_path / "out").exists()


def compress_series(paths: list[Path], folder: Path, compressor: str = "JPEG") -> str:
    """The DICOM files ``paths`` written again into ``folder`` with their pixel data compressed by
    GDCM (SimpleITK; "JPEG" is JPEG Lossless, process 14), the CT header fields put back with
    pydicom; returns the transfer syntax's name."""
    import locale

    import SimpleITK as sitk
    from pydicom import dcmread

    folder.mkdir(parents=True)
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer sets the C locale: put this process's back
    for path in paths:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        image = sitk.Cast(reader.Execute(), sitk.sitkInt16)  # HU (the intercept applied)
        for key in reader.GetMetaDataKeys():
            image.SetMetaData(key, reader.GetMetaData(key))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetImageIO("GDCMImageIO")
        writer.SetCompressor(compressor)
        writer.UseCompressionOn()
        writer.SetFileName(str(folder / path.name))
        writer.Execute(image)
        original, ds = dcmread(str(path)), dcmread(str(folder / path.name))
        for key in ("SOPClassUID", "Modality", "ImageType", "SeriesInstanceUID", "ImagePositionPatient",
                    "ImageOrientationPatient", "PixelSpacing"):
            setattr(ds, key, original.get(key))
        ds.save_as(str(folder / path.name), enforce_file_format=True)
    locale.setlocale(locale.LC_ALL, saved)
    return dcmread(str(folder / paths[0].name)).file_meta.TransferSyntaxUID.name


def test_a_jpeg_lossless_series_is_decoded_to_the_same_volume(tmp_path):
    """A series compressed with JPEG Lossless (which pydicom decodes only with a plugin) is read
    through SimpleITK: the same HU and affine as the uncompressed series."""
    hu, affine = reference_volume(2)
    plain = write_dicom_series(tmp_path / "plain" / "case", hu, affine)
    syntax = compress_series(plain, tmp_path / "jpeg" / "case")
    assert syntax.startswith("JPEG Lossless")
    outs = {name: prepare_dataset(tmp_path / name, tmp_path / f"out_{name}", val_fraction=0.0, progress=False,
                                  log=lambda _: None) for name in ("plain", "jpeg")}
    images = {name: nib.load(str(tmp_path / f"out_{name}" / "data" / "case.nii.gz")) for name in outs}
    np.testing.assert_array_equal(np.asanyarray(images["jpeg"].dataobj), hu)
    np.testing.assert_array_equal(np.asanyarray(images["plain"].dataobj), hu)
    np.testing.assert_allclose(images["jpeg"].affine, affine, atol=1e-4)
