import os

os.environ.setdefault("MPLBACKEND", "Agg")
# before torch is imported: OpenMP threads sleep rather than spin while waiting (busy CPUs)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest


@pytest.fixture(scope="session")
def smoke_cohort(tmp_path_factory):
    """The embedded synthetic cohort at the smoke preset's size, generated once per test session.

    Returns ``make_cohort_from_config``'s dict: root, tcia_root, tcia_json, btcv_root,
    btcv_json ({N: path}). Tests must not modify these files (copy them first).
    """
    from ssl_utils import get_config
    from ssl_utils.synthetic import make_cohort_from_config

    root = tmp_path_factory.mktemp("smoke_cohort")
    return make_cohort_from_config(get_config("smoke"), str(root), progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests: the smoke models are tiny, so one thread is as
    fast as several and does not stall when the CPU is shared. Module-scoped, so module fixtures
    that train (a reference run compared bitwise with a resumed one) run under it too; restores the
    thread count, and switches off deterministic algorithms (``deterministic=True`` sets them)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def lesion_dataset(tmp_path_factory):
    """A labeled dataset with its own two classes ("background", "lesion"), made the way a user
    makes one: CT volumes and label maps (NIfTI and NRRD) through ``python -m ssl_utils.prepare``.

    Three abdomen-sized phantoms (a soft-tissue ellipse in air, a brighter spherical lesion
    labelled 1); the split puts two in ``training`` and one in ``validation``. Returns
    ``prepare_dataset``'s ``PrepareResult`` (``json_path``, ``out``, ``labels``, ...). Tests must
    not modify these files.
    """
    import json

    import nibabel as nib
    import nrrd
    import numpy as np

    from ssl_utils.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("lesion_dataset")
    images, labels = root / "scans", root / "masks"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(5)
    shape, spacing = (48, 40, 24), (4.0, 4.0, 5.0)  # voxels, mm
    x, y, z = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    for i in range(3):
        body = ((x - 24) / 20) ** 2 + ((y - 20) / 15) ** 2 <= 1.0
        centre = np.array([20 + 6 * i, 18 + 2 * i, 12])
        lesion = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + ((z - centre[2]) * 1.25) ** 2) <= (4 + i) ** 2
        hu = np.where(body, 40.0, -1000.0) + np.where(lesion, 90.0, 0.0) + rng.normal(0, 10, shape)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = (-96.0, -80.0, -60.0 + 10 * i)
        nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), affine), str(images / f"pt{i}.nii.gz"))
        label = lesion.astype(np.uint8)
        if i == 1:  # a label map as NRRD (LPS space), the others as NIfTI
            lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
            nrrd.write(str(labels / f"pt{i}_seg.nrrd"), label,
                       {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]})
        else:
            nib.save(nib.Nifti1Image(label, affine), str(labels / f"pt{i}_seg.nii.gz"))
    names = root / "label_names.json"
    names.write_text(json.dumps({"0": "background", "1": "lesion"}))
    return prepare_dataset(images, root / "prepared", labels, names, val_fraction=0.34, seed=0, progress=False,
                           log=lambda _: None)
