"""Model configs: presets resolve, bad configs name their problem (the CLI turns these into exit code 2)."""

import json

import pytest

from vdeploy import config as C


def test_presets_resolve_with_every_default():
    for name, preset in C.PRESETS.items():
        cfg = C.load(name)
        assert set(cfg) == set(C.UNET_DEFAULTS) | set(C.DIFFUSION_DEFAULTS), name
        assert {k: cfg[k] for k in preset} == preset
        assert C.unet_kwargs(cfg)["dim"] == preset["dim"]
        assert C.diffusion_kwargs(cfg)["channels"] == cfg["channels"]


def test_json_file_round_trip(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"dim": 8, "dim_mults": [1, 2], "image_size": 16, "num_frames": 4}))
    cfg = C.load(path)
    assert (cfg["dim"], cfg["dim_mults"], cfg["timesteps"], cfg["norm_type"]) == (8, [1, 2], 1000, "group")


@pytest.mark.parametrize(
    "config, message",
    [
        ({"dim": 8, "image_size": 16, "num_frames": 4, "bogus": 1, "zzz": 2}, "unknown config key(s): bogus, zzz"),
        ({"image_size": 16, "num_frames": 4}, "missing the required key 'dim'"),
        ({"dim": 0, "image_size": 16, "num_frames": 4}, "'dim' must be a positive integer"),
        ({"dim": 8, "image_size": 20, "num_frames": 4}, "image_size 20 is not divisible by 2**3"),
        ({"dim": 8, "image_size": 16, "num_frames": 4, "norm_type": "layer"}, "'norm_type' must be 'group' or 'rms'"),
        ({"dim": 8, "image_size": 16, "num_frames": 4, "loss_type": "huber"}, "'loss_type' must be 'l1' or 'l2'"),
        ({"dim": 8, "image_size": 16, "num_frames": 4, "init_dim": 12}, "'init_dim' must equal 'dim' (8)"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_configs_name_the_problem(config, message):
    with pytest.raises(C.ConfigError) as e:
        C.resolve(config)
    assert message in str(e.value)


def test_neither_preset_nor_file(tmp_path):
    with pytest.raises(C.ConfigError, match="neither a preset"):
        C.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(C.ConfigError, match="cannot read config"):
        C.load(bad)
