"""The typed configuration: every way of making one is validated, and a made one cannot change."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ssl_utils.config import PRESETS, Config, ConfigError, from_flat, get_config


def test_unknown_setting_names_it_and_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        get_config("smoke", ssl_lrr=1e-3)
    msg = str(info.value)
    assert "'ssl_lrr'" in msg and "valid settings are" in msg, msg
    for valid in ("ssl_lr", "roi", "ft_iterations", "synth_seed"):
        assert f"'{valid}'" in msg, msg
    assert not msg.startswith("\"")  # a KeyError would print the message in quotes
    # ConfigError is a KeyError and a ValueError: callers may catch either
    with pytest.raises(KeyError):
        get_config("smoke", nope=1)
    with pytest.raises(ValueError):
        get_config("smoke", nope=1)
    with pytest.raises(KeyError, match="ssl_lrr"):
        get_config("smoke")["ssl_lrr"]


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError) as info:
        get_config("papper")
    msg = str(info.value)
    assert "'papper'" in msg and all(name in msg for name in ("demo", "paper", "smoke")), msg


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"roi": 40}, "patch_size"),  # smoke: patch 16; 40 is not a multiple
        ({"hidden_size": 30, "num_heads": 4}, "num_heads"),  # hidden not divisible by heads
        ({"hidden_size": 32, "num_heads": 3}, "num_heads"),
        ({"ssl_lr": -1e-3}, "ssl_lr"),
        ({"ft_lr": 0.0}, "ft_lr"),
        ({"ft_iterations": 2.5}, "ft_iterations"),  # wrong type: not an integer
        ({"ssl_epochs": "3"}, "ssl_epochs"),
        ({"ssl_epochs": True}, "ssl_epochs"),  # a bool is not an int here
        ({"cosine": 1}, "cosine"),  # nor an int a bool
        ({"amp": "x"}, "amp"),
        ({"proj_type": "linear"}, "proj_type"),
        ({"shuffle_prob": 1.5}, "shuffle_prob"),
        ({"cache_rate": -0.1}, "cache_rate"),
        ({"dropout_rate": 2.0}, "dropout_rate"),
        ({"inpaint_size": (10, 5)}, "inpaint_size"),  # min > max
        ({"ssl_spacing": (2.0, 2.0)}, "ssl_spacing"),  # wrong length
        ({"ssl_spacing": 2.0}, "ssl_spacing"),  # not a sequence
        ({"ssl_a_min": 200.0}, "a_min"),  # window upside down (a_max 164 in smoke)
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_invalid_values_are_refused_and_named(overrides, named):
    with pytest.raises(ConfigError, match=named):
        get_config("smoke", **overrides)


def test_valid_edge_values_are_accepted_and_coerced():
    cfg = get_config("smoke", ft_iterations=6.0, ssl_lr=1, shuffle_prob=1.0, cache_rate=0.0, amp="off",
                     inpaint_size=(4, 4))
    assert cfg["ft_iterations"] == 6 and type(cfg["ft_iterations"]) is int
    assert cfg["ssl_lr"] == 1.0 and type(cfg["ssl_lr"]) is float
    assert (cfg["shuffle_prob"], cfg["cache_rate"], cfg["amp"], cfg["inpaint_size"]) == (1.0, 0.0, "off", (4, 4))


def test_config_is_frozen():
    cfg = get_config("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.roi = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.pretrain = PRESETS["paper"].pretrain
    with pytest.raises(TypeError):
        cfg["roi"] = 64  # type: ignore[index]
    assert cfg["roi"] == 32 and cfg.model.roi == 32


def test_replace_validates_and_leaves_the_original():
    cfg = get_config("smoke")
    before = cfg.to_dict()
    new = cfg.replace(roi=48, ssl_lr=5e-4)
    assert (new["roi"], new.model.roi, new["ssl_lr"]) == (48, 48, 5e-4)
    assert new["hidden_size"] == cfg["hidden_size"] and new["preset"] == "smoke"
    assert cfg.to_dict() == before and cfg["roi"] == 32
    with pytest.raises(ConfigError, match="patch_size"):
        cfg.replace(roi=40)
    with pytest.raises(ConfigError, match="bogus"):
        cfg.replace(bogus=1)
    assert cfg.to_dict() == before


def test_a_dict_passed_to_get_config_is_validated():
    good = get_config("smoke").to_dict()
    assert get_config(good) == get_config("smoke")
    with pytest.raises(ConfigError, match="patch_size"):
        get_config({**good, "roi": 40})
    with pytest.raises(ConfigError, match="bogus"):
        get_config({**good, "bogus": 1})
    with pytest.raises(ConfigError, match="amp"):
        get_config({"amp": "x"})
    with pytest.raises(ConfigError, match="ft_iterations"):
        from_flat({"ft_iterations": -3})


def test_to_dict_from_flat_round_trip_through_json():
    for name, cfg in PRESETS.items():
        flat = cfg.to_dict()
        assert from_flat(flat) == cfg, name
        back = from_flat(json.loads(json.dumps(flat)))  # what a checkpoint or a JSON file gives back
        assert back == cfg and back["preset"] == name
        assert isinstance(back["ssl_spacing"], tuple) and isinstance(back.cohort.synth_train_sizes, tuple)
    cfg = get_config("demo", ssl_lr=3e-3, synth_train_sizes=(1, 2, 3))
    assert from_flat(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_json_lists_become_tuples_of_the_declared_type():
    cfg = get_config("smoke", ssl_spacing=[1, 2, 3], synth_train_sizes=[1, 3], inpaint_size=[2, 6.0])
    assert cfg["ssl_spacing"] == (1.0, 2.0, 3.0) and all(type(v) is float for v in cfg["ssl_spacing"])
    assert cfg["synth_train_sizes"] == (1, 3) and isinstance(cfg["synth_train_sizes"], tuple)
    assert cfg["inpaint_size"] == (2, 6) and all(type(v) is int for v in cfg["inpaint_size"])
    hash(cfg)  # frozen and made of tuples: usable as a key


def test_none_overrides_are_ignored():
    assert get_config("smoke", ssl_lr=None, roi=None, ft_iterations=None) == get_config("smoke")
    assert get_config("smoke").replace(seed=None, ft_iterations=7)["ft_iterations"] == 7


def test_presets_override_only_what_they_state():
    from ssl_utils.config import _PRESET_OVERRIDES

    paper, demo = get_config("paper"), get_config("demo")
    assert demo["ssl_lr"] != paper["ssl_lr"] and demo["ssl_lr"] == 1e-3
    assert demo["temperature"] == 1.0 != paper["temperature"] and demo["patch_size"] == paper["patch_size"]
    assert paper.to_dict() == {**Config().to_dict(), "preset": "paper"}  # paper = the defaults
    for name, overrides in _PRESET_OVERRIDES.items():
        cfg = PRESETS[name]
        for key in paper:
            if key == "preset":
                continue
            expected = overrides.get(key, paper[key])
            assert cfg[key] == expected, (name, key)
    # get_config with a Config as base applies overrides on top of it, not on the defaults
    assert get_config(demo, ssl_epochs=3)["ssl_lr"] == 1e-3
