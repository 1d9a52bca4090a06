"""What a bundle of this project is: its two kinds, its files, the exporter's name, and the
statements every bundle carries (references, intended use)."""

from __future__ import annotations

KINDS = ("encoder", "segmenter")
EXPORTER = "ssl_utils.bundle"
# the files of a bundle this module writes; a folder holding only these (and its folders) may be replaced
BUNDLE_FILES = ("configs/inference.json", "configs/metadata.json", "models/model.pt", "docs/README.md")
BUNDLE_DIRS = ("configs", "models", "docs")
DEFAULT_NAMES = {"encoder": "ssl_vit_encoder", "segmenter": "unetr_ct_segmentation"}
REFERENCES = [
    "Hatamizadeh A. et al. UNETR: Transformers for 3D Medical Image Segmentation. WACV 2022. "
    "https://arxiv.org/abs/2103.10504",
    "MONAI tutorial: self-supervised pre-training of a ViT (ViTAutoEnc) on TCIA-Covid19 CT, fine-tuned as "
    "UNETR's encoder on BTCV. https://github.com/Project-MONAI/tutorials/tree/main/self_supervised_pretraining",
]
# added to an encoder bundle of the masked-autoencoder pretext
MAE_REFERENCE = ("He K. et al. Masked Autoencoders Are Scalable Vision Learners. CVPR 2022. "
                 "https://arxiv.org/abs/2111.06377")
INTENDED_USE = "Research and teaching; not for clinical or diagnostic use."
# the orientation labels of the fine-tuning transforms (NIfTI world axes), stated explicitly
RAS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]
