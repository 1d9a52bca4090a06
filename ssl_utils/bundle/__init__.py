"""Export a trained model as a MONAI bundle (a self-describing folder MONAI's tools can run).

Two kinds, each from a checkpoint this project wrote (it holds the weights and the run's
``"config"``, from which the network's architecture and the preprocessing are taken):

- ``encoder``: a pre-training checkpoint of ``ssl_utils.pretrain`` (``runs/ssl/best_model.pt``). Of
  the two-view pretext, the bundle is its ``ViTAutoEnc`` (``network_def`` returns the
  reconstruction); of the masked autoencoder (``pretext="mae"``), its encoder alone in UNETR's ViT
  key names (``models/model.pt`` is exactly ``UNETR.vit``'s state dict; ``network_def`` is MONAI's
  ``ViT`` built as UNETR builds its ``vit`` and returns the token features). Its
  ``docs/README.md`` shows how to load the encoder into UNETR; its metadata states the
  pre-training recipe and the validation losses with their baselines.
- ``segmenter``: a fine-tuned UNETR of ``ssl_utils.finetune``. Its ``configs/inference.json``
  segments NIfTI volumes (the fine-tuning validation preprocessing, sliding-window inference,
  argmax, inversion to the input's geometry, one NIfTI label map per input); its metadata names
  the labels and states the run's Dice and training data.

A bundle folder holds ``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``
(the bare state dict) and ``docs/README.md``. The commands::

    python -m ssl_utils.bundle export --kind encoder --checkpoint runs/ssl/best_model.pt --out bundles/vit_encoder
    python -m ssl_utils.bundle export --kind segmenter \\
        --checkpoint runs/finetune/compare/n8/seed0/pretrained/best_model.pt --out bundles/unetr_seg

and then, with MONAI's bundle tools (``python -m monai.bundle`` needs the ``fire`` package)::

    python -m monai.bundle run --config_file bundles/unetr_seg/configs/inference.json --dataset_dir IN --output_dir OUT
    python -m monai.bundle verify_net_in_out network_def --meta_file bundles/unetr_seg/configs/metadata.json \\
        --config_file bundles/unetr_seg/configs/inference.json

``inference.json`` runs on MONAI alone (no pytorch-ignite): its ``initialize`` loads the weights,
``run`` segments every ``*.nii.gz`` / ``*.nii`` file of ``dataset_dir``. ``bundle_root`` is the
folder the bundle was exported to; after moving the bundle, pass ``--bundle_root NEW_FOLDER``.

One module per job: ``layout`` (the kinds, the files), ``configs`` (``inference.json``),
``metadata`` (``metadata.json``), ``readme`` (``docs/README.md`` from the files in
``templates/``), ``export`` (checkpoint in, checked bundle out), ``receive`` (the receiving end, as
``ssl_finetune.ipynb`` uses it: run a segmenter bundle, name and score its label maps), ``cli``
(``python -m ssl_utils.bundle``, ``ssl-bundle``).
"""

from ..checkpoint import CheckpointError
from .cli import build_parser, main
from .configs import encoder_inference_config, mae_encoder_inference_config, segmenter_inference_config
from .export import export_bundle, files_under, is_exported_bundle, read_checkpoint
from .layout import BUNDLE_FILES, DEFAULT_NAMES, EXPORTER, KINDS
from .metadata import encoder_metadata, mae_encoder_metadata, segmenter_metadata
from .receive import compare_label_map, folder_mib, label_map_path, run_segmenter

__all__ = [
    "BUNDLE_FILES", "DEFAULT_NAMES", "EXPORTER", "KINDS", "CheckpointError", "build_parser", "compare_label_map",
    "encoder_inference_config", "encoder_metadata", "export_bundle", "files_under", "folder_mib",
    "is_exported_bundle", "label_map_path", "mae_encoder_inference_config", "mae_encoder_metadata", "main",
    "read_checkpoint", "run_segmenter", "segmenter_inference_config", "segmenter_metadata",
]
