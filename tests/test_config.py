"""Model configs: presets resolve, bad configs name their problem (the CLI turns these into exit code 2)."""

import json

import pytest

from vdeploy import config as C


def test_presets_resolve_with_every_default():
    for name, preset in C.PRESETS.items():
        cfg = C.load(name)
        assert set(cfg) == (set(C.UNET_DEFAULTS) | set(C.DIFFUSION_DEFAULTS) | set(C.SCHEDULE_DEFAULTS)
                            | set(C.TRAINING_DEFAULTS)), name
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


BASE = {"dim": 8, "dim_mults": [1, 2], "image_size": 16, "num_frames": 4}


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("dim_mults", [], "a list of 1 to 8 integers from 1 to 64"),
        ("dim_mults", [1, 0], "a list of 1 to 8 integers from 1 to 64"),
        ("dim_mults", [1, 2.5], "a list of 1 to 8 integers from 1 to 64"),
        ("dim_mults", [True, 2], "a list of 1 to 8 integers from 1 to 64"),
        ("dim_mults", "1,2", "a list of 1 to 8 integers from 1 to 64"),
        ("dim", 7, "an even integer >= 4"),
        ("dim", 10**9, "an integer from 1 to 4096"),
        ("timesteps", 0, "an integer from 1 to 100000"),
        ("timesteps", "1000", "an integer from 1 to 100000"),
        ("timesteps", 1e3, "an integer from 1 to 100000"),
        ("channels", 2, "1, 3 or 4"),
        ("channels", True, "1, 3 or 4"),
        ("attn_heads", 0, "an integer from 1 to 256"),
        ("attn_heads", None, "an integer from 1 to 256"),
        ("attn_dim_head", -8, "an integer from 1 to 1024"),
        ("resnet_groups", 3, "must divide every block width dim * dim_mults = [8, 16]"),
        ("resnet_groups", 0, "an integer from 1 to 4096"),
        ("dynamic_thres_percentile", 0, "a number in (0, 1]"),
        ("dynamic_thres_percentile", 1.5, "a number in (0, 1]"),
        ("dynamic_thres_percentile", float("nan"), "a number in (0, 1]"),
        ("dynamic_thres_percentile", "0.9", "a number in (0, 1]"),
        ("loss_type", 1, "'l1' or 'l2'"),
        ("block_type", "convnext", "'resnet'"),
        ("beta_schedule", "linear", "'cosine'"),
        ("prediction_type", "x0", "'eps' or 'v'"),
        ("loss_weighting", "snr", "'none' or 'min_snr'"),
        ("min_snr_gamma", -1, "a positive number"),
        ("use_dynamic_thres", "yes", "true or false"),
        ("use_sparse_linear_attn", 1, "true or false"),
        ("text_use_bert_cls", None, "true or false"),
        ("cond_dim", 0, "an integer from 1 to 65536 or null"),
        ("cond_dim", 1.5, "an integer from 1 to 65536 or null"),
        ("out_dim", 1, "must equal 'channels' (3) or be null"),
        ("init_kernel_size", 4, "must be odd"),
        ("num_frames", 0, "a positive integer"),
        ("image_size", 15, "not divisible by 2**1"),
    ],
)
def test_every_key_is_type_and_range_checked(key, value, allowed):
    with pytest.raises(C.ConfigError) as e:
        C.resolve({**BASE, key: value})
    message = str(e.value)
    assert allowed in message
    assert (key if key == "image_size" else f"'{key}'") in message and repr(value) in message, message


def test_group_norm_groups_only_matter_for_group_norm():
    assert C.resolve({**BASE, "resnet_groups": 3, "norm_type": "rms"})["resnet_groups"] == 3
    assert C.resolve({**BASE, "resnet_groups": 4})["resnet_groups"] == 4


def test_tuples_become_lists_and_values_stay_plain():
    cfg = C.resolve({**BASE, "dim_mults": (1, 2), "dynamic_thres_percentile": 1})
    assert cfg["dim_mults"] == [1, 2] and isinstance(cfg["dynamic_thres_percentile"], float)


def test_config_files_that_cannot_be_read(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(C.ConfigError, match="cannot read config"):
        C.load(deep)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"dim": 8, "n\xe9": 1}')
    with pytest.raises(C.ConfigError, match="cannot read config"):
        C.load(latin)
    with pytest.raises(C.ConfigError, match="neither a preset"):
        C.load("bad\0name")
