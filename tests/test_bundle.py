"""MONAI bundles from this project's checkpoints (``ssl_utils.bundle``): both kinds export from real
smoke runs, carry the metadata MONAI's bundle specification requires, parse and load their weights
strictly, pass ``verify_net_in_out``, and the segmenter's ``inference.json`` runs under ``monai.bundle
run`` and writes label maps on the inputs' own voxels; a masked autoencoder's encoder bundle is
exactly UNETR's ViT (its keys, its weights, its features); wrong checkpoints and occupied folders are
refused with a message that names the file and the problem."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from ssl_utils import build_unetr, get_config, load_pretrained_vit
from ssl_utils.bundle import (BUNDLE_FILES, compare_label_map, export_bundle, folder_mib, label_map_path, main,
                              run_segmenter)
from ssl_utils.checkpoint import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED_META = ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                 "required_packages_version", "task", "description", "authors", "copyright",
                 "network_data_format", "name")
IMAGE_INPUT = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
               "channel_def")

def monai_bundle(*args: str, cwd: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` in a subprocess (one thread), from ``cwd``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smoke_cohort, one_thread):
    """One smoke pre-training run and one fine-tuning run (2 iterations, Dice after each): their best_model.pt."""
    from ssl_utils.finetune import finetune
    from ssl_utils.pretrain import pretrain

    root = tmp_path_factory.mktemp("runs")
    pretrain(get_config("smoke"), logdir=str(root / "ssl"), cohort_root=smoke_cohort["root"], progress=False,
             log=lambda m: None)
    finetune(get_config("smoke", ft_iterations=2, ft_eval_every=1), data_root=smoke_cohort["btcv_root"],
             json_path=smoke_cohort["btcv_json"][1], logdir=str(root / "ft"), use_pretrained=False, progress=False,
             log=lambda m: None)
    return {"encoder": str(root / "ssl" / "best_model.pt"), "segmenter": str(root / "ft" / "best_model.pt")}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, runs):
    root = tmp_path_factory.mktemp("bundles")
    return {kind: export_bundle(kind, runs[kind], str(root / kind)) for kind in ("encoder", "segmenter")}


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory, smoke_cohort, one_thread):
    """A smoke pre-training run of the masked autoencoder (pretext="mae"): its best_model.pt."""
    from ssl_utils.pretrain import pretrain

    root = tmp_path_factory.mktemp("mae_run")
    pretrain(get_config("smoke", pretext="mae"), logdir=str(root), cohort_root=smoke_cohort["root"], progress=False,
             log=lambda m: None)
    return str(root / "best_model.pt")


@pytest.fixture(scope="module")
def mae_bundle(tmp_path_factory, mae_run):
    return export_bundle("encoder", mae_run, str(tmp_path_factory.mktemp("mae_bundle") / "encoder"))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory, smoke_cohort):
    """Two CT volumes to segment: a cohort image as it is (.nii.gz), and a crop of it with another
    spacing, origin and axis order (.nii); plus a file that is not a volume."""
    folder = tmp_path_factory.mktemp("volumes")
    source = sorted(glob.glob(os.path.join(smoke_cohort["btcv_root"], "imagesTr", "*.nii.gz")))[0]
    image = nib.load(source)
    nib.save(image, str(folder / "first.nii.gz"))
    data = np.asanyarray(image.dataobj)[5:50, 8:60, 2:]
    affine = np.array([[0.0, 4.0, 0.0, -100.0], [5.0, 0.0, 0.0, 20.0], [0.0, 0.0, 7.0, -50.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), str(folder / "second.nii"))
    (folder / "notes.txt").write_text("not a volume")
    return str(folder)


def _meta(folder: str) -> dict:
    with open(os.path.join(folder, "configs", "metadata.json"), encoding="utf-8") as f:
        return json.load(f)


def _parser(folder: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(folder, "configs", "inference.json"))
    parser.read_meta(os.path.join(folder, "configs", "metadata.json"))
    return parser


def _spec_fields(folder: str) -> dict:
    """The bundle's metadata, after checking its files and the fields MONAI's specification requires."""
    files = sorted(os.path.relpath(p, folder).replace(os.sep, "/")
                   for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p))
    assert files == sorted(BUNDLE_FILES), folder
    meta = _meta(folder)
    assert [k for k in REQUIRED_META if k not in meta] == [], folder
    assert meta["version"] in meta["changelog"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert [k for k in IMAGE_INPUT if k not in image] == [] and image["spatial_shape"] == [32, 32, 32]
    assert "pred" in meta["network_data_format"]["outputs"]
    return meta


def test_metadata_holds_the_spec_fields_labels_dice_and_recipe(bundles, runs):
    for folder in bundles.values():
        _spec_fields(folder)
    ft = torch.load(runs["segmenter"], weights_only=True)
    seg = _meta(bundles["segmenter"])
    channel_def = seg["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert [channel_def[str(i)] for i in range(len(channel_def))] == ft["class_names"]
    last = ft["history"][-1]
    assert seg["eval_metrics"]["mean_dice"] == pytest.approx(last["val_mean_dice"])
    per_class = seg["eval_metrics"]["per_class_dice"]
    assert list(per_class) == ft["class_names"][1:]
    assert all(per_class[n] == pytest.approx(last[f"dice_{n}"]) for n in per_class)
    assert seg["training"]["n_train"] == 1 and seg["training"]["use_pretrained"] is False
    ssl = torch.load(runs["encoder"], weights_only=True)
    enc = _meta(bundles["encoder"])
    recipe, row = enc["pretraining"], [r for r in ssl["history"] if "val_recon" in r][-1]
    assert recipe["preset"] == "smoke" and recipe["epochs_run"] == ssl["epoch"] == 2
    assert recipe["temperature"] == ssl["config"]["temperature"] and recipe["ssl_lr"] == ssl["config"]["ssl_lr"]
    assert recipe["ssl_spacing"] == ssl["config"]["ssl_spacing"] and enc["architecture"]["roi"] == 32
    losses = enc["eval_metrics"]
    assert losses["val_recon_l1"] == pytest.approx(row["val_recon"])
    assert losses["baseline_constant_l1"] == pytest.approx(row["val_const_l1"])
    assert losses["baseline_copy_view1_l1"] == pytest.approx(row["val_copy_l1_1"])
    assert "load_pretrained_vit" in open(os.path.join(bundles["encoder"], "docs", "README.md")).read()


def test_network_def_builds_and_loads_the_weights_strictly(bundles):
    from monai.networks.nets import UNETR, ViTAutoEnc

    for kind, folder in bundles.items():
        net = _parser(folder).get_parsed_content("network_def")
        assert isinstance(net, ViTAutoEnc if kind == "encoder" else UNETR)
        state = torch.load(os.path.join(folder, "models", "model.pt"), weights_only=True)
        net.load_state_dict(state, strict=True)
        out = net.eval()(torch.rand(1, 1, 32, 32, 32))
        assert out.shape == ((1, 1, 32, 32, 32) if kind == "encoder" else (1, 14, 32, 32, 32))
    # the encoder README's two ways into UNETR: the project's helper and copying the keys
    weights = os.path.join(bundles["encoder"], "models", "model.pt")
    report = load_pretrained_vit(build_unetr(get_config("smoke")), weights)
    assert not report.missing and report.loaded
    unetr = build_unetr(get_config("smoke"))
    encoder = {k: v for k, v in torch.load(weights, weights_only=True).items() if not k.startswith("conv3d_transpose")}
    unetr.vit.load_state_dict(encoder, strict=True)


def test_mae_encoder_bundle_is_unetrs_vit(mae_bundle, mae_run):
    """The bundle of a masked autoencoder holds UNETR.vit's state dict, nothing else: its keys, the
    checkpoint's encoder tensors (the final LayerNorm blocks.L as norm), loaded strictly by both of
    its README's ways; its network gives UNETR's ViT's features; the MAE's fixed sin-cos table becomes
    the starting value of UNETR's learnable (still trainable) position embedding."""
    from monai.networks.nets import ViT

    from ssl_utils.mae import build_mae, mae_encoder_state

    ckpt = torch.load(mae_run, weights_only=True)
    cfg = get_config(ckpt["config"])
    weights = os.path.join(mae_bundle, "models", "model.pt")
    state = torch.load(weights, weights_only=True)
    unetr = build_unetr(cfg)
    assert sorted(state) == sorted(unetr.vit.state_dict())
    last = cfg["num_layers"]
    assert {"norm.weight", "norm.bias", f"blocks.{last - 1}.mlp.linear1.weight"} <= set(state)
    assert not any(k.startswith(("cls_token", "mask_tokens", "decoder", f"blocks.{last}.")) for k in state)
    expected, _ = mae_encoder_state(ckpt["state_dict"])
    assert [k for k in state if not torch.equal(state[k], expected[k])] == []
    assert torch.equal(state["norm.weight"], ckpt["state_dict"][f"blocks.{last}.weight"])
    unetr.vit.load_state_dict(state, strict=True)
    report = load_pretrained_vit(build_unetr(cfg), weights)
    assert sorted(report.loaded) == sorted(state) and not report.missing and not report.unexpected
    assert "ignored 0 non-encoder tensors" in str(report)

    # the position embedding: the MAE's fixed sin-cos table (not trained), now UNETR's trainable parameter
    mae = build_mae(cfg)
    table = mae.patch_embedding.position_embeddings
    assert not table.requires_grad and torch.equal(ckpt["state_dict"]["patch_embedding.position_embeddings"], table)
    pos = unetr.vit.patch_embedding.position_embeddings
    assert torch.equal(pos, table) and pos.requires_grad
    assert any(p is pos for p in unetr.vit.parameters())

    # the bundle's network, as a receiver initialises it: UNETR's ViT's final features on the same crop
    parser = _parser(mae_bundle)
    parser["device"] = "$torch.device('cpu')"
    parser.get_parsed_content("initialize")
    net = parser.get_parsed_content("network")
    assert isinstance(net, ViT) and not net.training and not hasattr(net, "cls_token")
    assert net.patch_embedding.position_embeddings.requires_grad  # learnable, as in UNETR
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        features = net(x)
        reference, hidden = unetr.vit.eval()(x)
        fresh = _parser(mae_bundle).get_parsed_content("network_def").eval()(x)
    assert features.shape == (1, 8, cfg["hidden_size"]) == reference.shape and len(hidden) == last
    assert torch.allclose(features, reference, atol=1e-6)
    assert not torch.allclose(fresh, reference, atol=1e-3)  # the features come from the loaded weights


def test_mae_encoder_metadata_and_readme(mae_bundle, mae_run):
    ckpt = torch.load(mae_run, weights_only=True)
    cfg = ckpt["config"]
    meta = _spec_fields(mae_bundle)
    assert meta["exported_by"]["kind"] == "encoder"
    assert "masked autoencoder" in meta["task"] and "masked autoencoder" in meta["description"]
    assert f"mask ratio {cfg['mae_mask_ratio']:g}" in meta["description"]
    assert f"hidden size {cfg['mae_decoder_hidden']}" in meta["description"]
    assert f"for {ckpt['epoch']} epoch(s)" in meta["description"]
    recipe = meta["pretraining"]
    assert recipe["pretext"] == "mae" and recipe["epochs_run"] == ckpt["epoch"] == 2
    assert {k: recipe[k] for k in ("mae_mask_ratio", "mae_decoder_hidden", "mae_decoder_mlp", "mae_decoder_layers",
                                   "mae_decoder_heads", "mae_norm_target", "mae_loss", "ssl_lr")} \
        == {k: cfg[k] for k in ("mae_mask_ratio", "mae_decoder_hidden", "mae_decoder_mlp", "mae_decoder_layers",
                                "mae_decoder_heads", "mae_norm_target", "mae_loss", "ssl_lr")}
    assert "temperature" not in recipe and "deconv_chns" not in meta["architecture"]
    row = [r for r in ckpt["history"] if "val_recon" in r][-1]
    metrics = meta["eval_metrics"]
    assert metrics["epoch"] == row["epoch"]
    for key in ("val_recon", "val_total", "val_patch_mean", "val_visible_mean"):
        assert metrics[key] == pytest.approx(row[key]), key
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 8 and pred["shape"] == [1, 8, cfg["hidden_size"]]
    assert "token features" in meta["pred_classes"] and any("Masked Autoencoders" in r for r in meta["references"])
    readme = open(os.path.join(mae_bundle, "docs", "README.md"), encoding="utf-8").read()
    weights = os.path.join(mae_bundle, "models", "model.pt")
    assert f'load_pretrained_vit(unetr, "{weights}")' in readme
    assert f'unetr.vit.load_state_dict(torch.load("{weights}"' in readme and "strict=True" in readme
    assert "conv3d_transpose" not in readme and "sin-cos" in readme and "[1, 8, 48]" in readme


def test_mae_checkpoints_that_do_not_fit_are_refused(mae_run, runs, tmp_path):
    out = str(tmp_path / "bundle")
    with pytest.raises(CheckpointError, match=r"--kind segmenter needs a fine-tuning checkpoint.*MaskedAutoEncoderViT"
                                              r".*has mask_tokens.*--kind encoder"):
        export_bundle("segmenter", mae_run, out)
    ckpt = torch.load(mae_run, weights_only=True)
    views = str(tmp_path / "says_views.pt")
    torch.save({**ckpt, "config": {**ckpt["config"], "pretext": "views"}}, views)
    with pytest.raises(CheckpointError, match=r"says_views\.pt: its state dict is MaskedAutoEncoderViT's.*"
                                              r"pretext='views'"):
        export_bundle("encoder", views, out)
    two_view = torch.load(runs["encoder"], weights_only=True)
    says_mae = str(tmp_path / "says_mae.pt")
    torch.save({**two_view, "config": {**two_view["config"], "pretext": "mae"}}, says_mae)
    with pytest.raises(CheckpointError, match=r"says_mae\.pt: its state dict is ViTAutoEnc's.*pretext='mae'"):
        export_bundle("encoder", says_mae, out)
    six = str(tmp_path / "six_layers.pt")
    torch.save({**ckpt, "config": {**ckpt["config"], "num_layers": 6}}, six)
    with pytest.raises(CheckpointError, match=r"six_layers\.pt: .*does not fit UNETR's ViT.*num_layers=6"):
        export_bundle("encoder", six, out)
    assert not os.path.exists(out)


@pytest.mark.parametrize("kind", ["encoder", "segmenter", "mae_encoder"])
def test_verify_net_in_out_passes(bundles, kind, tmp_path, request):
    folder = request.getfixturevalue("mae_bundle") if kind == "mae_encoder" else bundles[kind]
    done = monai_bundle("verify_net_in_out", "network_def", "--meta_file", os.path.join(folder, "configs", "metadata.json"),
                        "--config_file", os.path.join(folder, "configs", "inference.json"), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "verified with no error" in done.stdout + done.stderr


def test_bundle_run_writes_one_label_map_per_input_in_its_geometry(bundles, volumes, tmp_path, monkeypatch):
    out = tmp_path / "labels"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", ROOT)
    done = run_segmenter(bundles["segmenter"], volumes, out, timeout=300)
    assert sorted(os.listdir(out)) == ["first_seg.nii.gz", "second_seg.nii.gz"]
    # one line per volume with its time, then the summary
    assert sorted(os.path.basename(p) for p, _ in done["volumes"]) == ["first_seg.nii.gz", "second_seg.nii.gz"], \
        done["stdout"]
    assert f"segmented 2 volume(s) of {volumes} into {out}" in done["stdout"]
    for name, ext in (("first", ".nii.gz"), ("second", ".nii")):
        image, labels = nib.load(os.path.join(volumes, name + ext)), nib.load(str(out / f"{name}_seg.nii.gz"))
        assert label_map_path(out, os.path.join(volumes, name + ext)) == str(out / f"{name}_seg.nii.gz")
        assert labels.shape == image.shape, name
        assert np.allclose(labels.affine, image.affine, atol=1e-4), name
        values = np.asanyarray(labels.dataobj)
        assert np.issubdtype(values.dtype, np.integer) and values.min() >= 0 and values.max() <= 13
    # the comparison of a label map with a ground truth: a map against itself scores 1 where it labels
    # anything, and a ground truth with one class more lowers the Dice
    image, pred = os.path.join(volumes, "second.nii"), str(out / "second_seg.nii.gz")
    case, item = compare_label_map(image, pred, pred, 14, -175, 250)
    # (this volume's axes are swapped: RAS order)
    assert sorted(case["shape"]) == sorted(nib.load(image).shape) and case["same_shape_and_affine"]
    assert item["image"].min() >= 0 and item["image"].max() <= 1
    assert case["mean_dice"] == 1.0 or (np.isnan(case["mean_dice"]) and int(item["pred"].max()) == 0)
    other = nib.load(pred)
    changed = np.asanyarray(other.dataobj).copy()
    changed[: changed.shape[0] // 2] = 13
    nib.save(nib.Nifti1Image(changed, other.affine), str(tmp_path / "truth.nii.gz"))
    assert compare_label_map(image, str(tmp_path / "truth.nii.gz"), pred, 14, -175, 250)[0]["mean_dice"] < 1
    assert folder_mib(bundles["segmenter"]) > os.path.getsize(os.path.join(bundles["segmenter"], "models",
                                                                           "model.pt")) / 2**20
    with pytest.raises(RuntimeError, match=r"monai\.bundle run of .*inference\.json failed"):
        run_segmenter(bundles["segmenter"], tmp_path / "empty", out, timeout=300)


def test_label_maps_lie_on_the_input_voxels(bundles, volumes, tmp_path, one_thread):
    """With a network that labels the windowed intensity above 0.5 (HU > 37.5) as class 1, the
    written map must match thresholding the input itself: the resampling, the reorientation (the
    second volume's axes are swapped) and the crop are undone. A shift of 3 voxels scores ~0.6."""
    parser = _parser(bundles["segmenter"])
    parser["dataset_dir"], parser["output_dir"] = volumes, str(tmp_path)
    parser["network"] = "$lambda x: torch.cat([0.5 - x, x - 0.5], dim=1)"
    parser["initialize"] = []
    parser.get_parsed_content("run")
    for name, ext in (("first", ".nii.gz"), ("second", ".nii")):
        bright = np.asanyarray(nib.load(os.path.join(volumes, name + ext)).dataobj) > -175 + 0.5 * 425
        labelled = np.asanyarray(nib.load(str(tmp_path / f"{name}_seg.nii.gz")).dataobj) == 1
        dice = 2 * (bright & labelled).sum() / (bright.sum() + labelled.sum())
        assert dice > 0.75, (name, dice)


def test_wrong_checkpoints_and_occupied_folders_are_refused(runs, tmp_path):
    out = str(tmp_path / "bundle")
    with pytest.raises(CheckpointError, match=r"best_model\.pt: --kind segmenter needs a fine-tuning checkpoint.*"
                                              r"pre-training checkpoint.*--kind encoder"):
        export_bundle("segmenter", runs["encoder"], out)
    with pytest.raises(CheckpointError, match=r"--kind encoder needs a pre-training checkpoint.*out\.conv\.conv\.weight"):
        export_bundle("encoder", runs["segmenter"], out)
    missing = str(tmp_path / "nowhere.pt")
    with pytest.raises(CheckpointError, match=rf"{missing}: file not found"):
        export_bundle("encoder", missing, out)
    bare = str(tmp_path / "no_config.pt")
    torch.save({"state_dict": torch.load(runs["encoder"], weights_only=True)["state_dict"]}, bare)
    with pytest.raises(CheckpointError, match=r"no_config\.pt: no 'config' entry"):
        export_bundle("encoder", bare, out)
    assert not os.path.exists(out)
    # a folder with a user's file is left alone; a bundle of ours is replaced, unless a file was added to it
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"mine already holds files that are not a bundle exported by ssl_utils\.bundle "
                                         r"\(notes\.txt\): refusing"):
        export_bundle("encoder", runs["encoder"], str(user))
    assert (user / "notes.txt").read_text() == "keep me" and os.listdir(user) == ["notes.txt"]
    export_bundle("encoder", runs["encoder"], out)
    assert export_bundle("segmenter", runs["segmenter"], out) == out
    assert _meta(out)["exported_by"]["kind"] == "segmenter"
    os.makedirs(os.path.join(out, "eval"))
    open(os.path.join(out, "eval", "case_seg.nii.gz"), "w").close()
    with pytest.raises(ValueError, match=r"eval/case_seg\.nii\.gz"):
        export_bundle("segmenter", runs["segmenter"], out)


def test_command_line(runs, tmp_path, capsys):
    done = subprocess.run([sys.executable, "-m", "ssl_utils.bundle", "export", "--help"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}, timeout=120)
    assert done.returncode == 0 and "--kind {encoder,segmenter}" in done.stdout and "--checkpoint" in done.stdout
    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    assert exit_help.value.code == 0 and "export" in capsys.readouterr().out
    out = str(tmp_path / "cli")
    assert main(["export", "--kind", "encoder", "--checkpoint", runs["encoder"], "--out", out]) == 0
    assert "wrote the encoder bundle" in capsys.readouterr().out and os.path.isfile(os.path.join(out, "models", "model.pt"))
    with pytest.raises(SystemExit) as refused:
        main(["export", "--kind", "segmenter", "--checkpoint", runs["encoder"], "--out", str(tmp_path / "other")])
    assert refused.value.code == 2 and "--kind segmenter needs a fine-tuning checkpoint" in capsys.readouterr().err


def test_preprocessing_is_the_projects_own_chain(bundles, runs, volumes):
    """The bundle restates ssl_utils.transforms' deterministic stage as config: same arrays."""
    import torch

    from ssl_utils.checkpoint import load_checkpoint
    from ssl_utils.config import get_config
    from ssl_utils.transforms import finetune_deterministic, pretrain_deterministic
    from monai.transforms import Compose

    for path in (os.path.join(volumes, "first.nii.gz"), os.path.join(volumes, "second.nii")):
        for kind in ("encoder", "segmenter"):
            cfg = get_config(load_checkpoint(runs[kind])["config"])
            ours = (pretrain_deterministic(cfg) if kind == "encoder" else
                    finetune_deterministic(cfg))
            if kind == "segmenter":  # the project's chain carries the label too; feed it the image as label
                expected = Compose(ours)({"image": path, "label": path})["image"]
            else:
                expected = Compose(ours)({"image": path})["image"]
            got = _parser(bundles[kind]).get_parsed_content("preprocessing")({"image": path})["image"]
            assert tuple(got.shape) == tuple(expected.shape), (kind, path)
            assert torch.allclose(torch.as_tensor(got), torch.as_tensor(expected)), (kind, path)
