"""The command line: ``python -m ssl_utils.bundle export`` (also ``ssl-bundle export``)."""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from ..checkpoint import CheckpointError
from .export import export_bundle
from .layout import BUNDLE_FILES, KINDS

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_utils.bundle",
        description="Export a checkpoint of this project as a MONAI bundle (configs/inference.json, "
                    "configs/metadata.json, models/model.pt, docs/README.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ex = sub.add_parser(
        "export", help="write a bundle from a checkpoint",
        description="Write a MONAI bundle from a pre-training (--kind encoder) or fine-tuning (--kind segmenter) "
                    "checkpoint. A segmenter bundle runs with: python -m monai.bundle run --config_file "
                    "OUT/configs/inference.json --dataset_dir IN --output_dir PRED",
    )
    ex.add_argument("--kind", required=True, choices=KINDS,
                    help="encoder: a pre-training checkpoint (runs/ssl/best_model.pt): the two-view pretext's ViTAutoEnc, or "
                         "the masked autoencoder's encoder alone, as UNETR's ViT; segmenter: a fine-tuned UNETR")
    ex.add_argument("--checkpoint", required=True, help="the checkpoint (best_model.pt or last_model.pt of a run)")
    ex.add_argument("--out", required=True,
                    help="the bundle folder: new, empty, or a bundle exported before (replaced); never other files")
    ex.add_argument("--name", default=None, help="the bundle's name (default: ssl_vit_encoder / unetr_ct_segmentation)")
    ex.add_argument("--version", default="0.1.0", help="the bundle's version (default 0.1.0)")
    ex.add_argument("--authors", default="ssl_utils users", help="metadata 'authors'")
    ex.add_argument("--copyright", default="Copyright (c) the authors of the training run", help="metadata 'copyright'")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        folder = export_bundle(args.kind, args.checkpoint, args.out, name=args.name, version=args.version,
                               authors=args.authors, copyright=args.copyright)
    except (CheckpointError, ValueError) as exc:
        parser.exit(2, f"{parser.prog} export: error: {exc}\n")
    size = os.path.getsize(os.path.join(folder, "models", "model.pt"))
    print(f"wrote the {args.kind} bundle {folder} ({', '.join(BUNDLE_FILES)}; model.pt {size / 2**20:.1f} MiB)")
    if args.kind == "segmenter":
        print(f"run it: python -m monai.bundle run --config_file {os.path.join(folder, 'configs', 'inference.json')} "
              "--dataset_dir IN --output_dir OUT")
    return 0
