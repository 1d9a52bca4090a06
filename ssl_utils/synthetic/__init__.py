"""Deterministic synthetic CT cohort: TCIA-Covid19-like unlabeled chest CT + BTCV-like 13-organ labeled abdomen.

The real data sets cannot be downloaded here, so this module paints CT-like volumes in Hounsfield units
(HU) from anatomical priors with per-subject variation, and writes them in the same on-disk layout and
datalist format as the reference tutorial:

    root/tcia/data/volume-synth-0000.nii.gz ...     root/tcia/dataset_split.json
    root/btcv/imagesTr/img0001.nii.gz ...           root/btcv/labelsTr/label0001.nii.gz ...
    root/btcv/dataset_0_init_{N}.json               root/cohort.json (generation parameters)

Kinds (``generate_subject(kind=...)``). "btcv": contrast-enhanced abdominal CT with labels. "tcia": the same
abdominal renderer, more variable (some non-contrast), unlabeled. "chest": non-contrast chest CT like
TCIA-Covid19 (what the reference pre-trains on), unlabeled: lungs with vessel and bronchial trees, airways,
heart, great vessels, chest wall, ribs, sternum, shoulder girdle and thoracic spine, COVID-19-like opacities
in about 45% of the subjects. ``make_synthetic_dataset(unlabeled_kind="chest" | "abdomen")`` renders the
unlabeled volumes with "chest" (default) or "tcia"; the labeled volumes are always "btcv".

Geometry. Arrays are indexed [X, Y, Z] with a positive-diagonal (RAS+) affine: index X grows towards the
patient's RIGHT (NIfTI RAS+), Y towards ANTERIOR, Z towards SUPERIOR. The liver, gallbladder, right kidney,
right adrenal and IVC therefore sit at high X; spleen, stomach, left kidney and left adrenal at low X
(as in real BTCV volumes after MONAI ``Orientationd(axcodes="RAS")``). For a radiological display
(patient's right on the viewer's left) show ``image[::-1, :, k].T`` with ``origin="lower"``.

Image formation: tissues are painted in HU (float32) with per-subject intensity jitter and per-voxel
texture, Gaussian-blurred (about 0.6-0.9 voxel), Gaussian noise (sd 10-20 HU) is added, and the result is
rounded to int16 and clipped to [-1024, 3071]. Labels use the BTCV indices in ``ORGANS``; organs are
painted in a fixed order (later ones overwrite earlier ones), and every one of the 13 organs is
guaranteed at least ``_MIN_ORGAN_VOXELS`` voxels (checked, enlarged if needed).

Modules: ``canvas`` (the voxel canvas and its primitives), ``abdomen`` (the abdominal renderer),
``chest`` (the chest renderer), ``subject`` (rendering and image formation of one subject:
``generate_subject``), ``cohort`` (the files on disk: ``make_synthetic_dataset``,
``make_cohort_from_config``).

Code layout (abdomen). ``_render`` builds a ``_Scene`` (the ``_Canvas`` volumes plus the subject's body frame, tissue
HU values, random streams and shared masks), runs the unlabeled ``_STRUCTURE_PAINTERS`` in order, then the
labeled ``_ORGAN_PAINTERS`` (each organ: a sampler that draws its shape, a painter that draws it), and
finally blurs, adds noise and quantises. The order of every random draw is part of the output: a subject is
a bit-for-bit deterministic function of its seed, so painters must not be reordered.

Code layout (chest). ``_render_chest`` builds a ``_ChestScene`` (a ``_Scene`` with per-slice thoracic cavity
dimensions, the lung mask and landmarks; five random streams: parameters, geometry, vessel / airway trees,
opacities, texture), runs the ``_CHEST_PAINTERS`` in order (reusing the canvas primitives, ``paint_table``,
``paint_back_muscles`` and the vertebra painter ``_paint_vertebral_column``) and forms the image with the
same ``_form_image`` / ``_scanner_affine``. Chest template: z = 0 at the top of the right hemidiaphragm dome.
The chest code makes no draw from the abdominal streams, so "btcv" / "tcia" subjects do not depend on it.
"""

from ..organs import ORGANS
from .cohort import COHORT_VERSION, _subject_seed, make_cohort_from_config, make_synthetic_dataset  # noqa: F401
from .subject import generate_subject

__all__ = ["ORGANS", "generate_subject", "make_synthetic_dataset", "make_cohort_from_config"]
