import pytest

from lecompile import LongExposureConfig


@pytest.mark.parametrize("field,value,message", [
    ("mlp_density", 0.0, r"mlp_density must be a number in \(0, 1\], got 0.0"),
    ("mlp_density", 1.5, r"mlp_density must be a number in \(0, 1\]"),
    ("attn_density", -0.1, r"attn_density must be a number in \(0, 1\]"),
    ("mlp_density", "0.5", r"mlp_density must be a number in \(0, 1\], got '0.5'"),
    ("predictor", "magic", r"predictor must be one of \('oracle', 'svd', 'learned'\), got 'magic'"),
    ("granularity", "token", r"granularity must be one of"),
    ("tile_size", 100, r"tile_size must be a positive multiple of 16, got 100"),
    ("svd_rank", 0, r"svd_rank must be an integer >= 1"),
    ("k_align", True, r"k_align must be an integer >= 1"),
    ("cudagraphs", "yes", r"cudagraphs must be a bool"),
    ("disable", {"fuse_losses"},
     r"disable: unknown pass name\(s\) \['fuse_losses'\]; the passes that can be turned off are \[.*'fuse_loss'"),
    ("disable", "fuse_loss", r"disable must be a set of pass names, got 'fuse_loss'"),
])
def test_bad_values_name_the_field_and_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        LongExposureConfig.create(**{field: value})


def test_a_dozen_public_fields_and_the_tuning_knobs_apart():
    import dataclasses

    from lecompile.config import Tuning
    public = [f.name for f in dataclasses.fields(LongExposureConfig) if not f.name.startswith("_")]
    assert len(public) <= 12, public
    config = LongExposureConfig.create(mlp_density=0.5, k_align=64, disable={"fuse_loss"})
    assert config.tuning == Tuning(k_align=64) and not config.enabled("fuse_loss") and config.enabled("fuse_lora")
    assert config.replace(svd_rank=4).tuning == Tuning(k_align=64, svd_rank=4)


def test_the_long_context_preset_is_the_setting_the_quality_harness_measured():
    from benchmarks.quality import settings
    measured = settings(300, task="recall")["attn-0.5"]
    assert LongExposureConfig.preset("long-context") == LongExposureConfig.create(**measured)


def test_presets_by_name():
    assert LongExposureConfig.preset("exact") == LongExposureConfig()
    fast = LongExposureConfig.preset("fast", cudagraphs=False)
    assert fast.sparse and fast.mlp_density < 1.0 and not fast.cudagraphs
    with pytest.raises(ValueError, match=r"unknown preset 'fastest'; the presets are \['exact', 'fast', 'long-"):
        LongExposureConfig.preset("fastest")


def test_unknown_field_is_refused():
    with pytest.raises(TypeError, match="mlp_sparsity"):
        LongExposureConfig(mlp_sparsity=0.5)


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("LECOMPILE_MLP_DENSITY", "0.25")
    monkeypatch.setenv("LECOMPILE_PREDICTOR", "oracle")
    monkeypatch.setenv("LECOMPILE_DISABLE", "rewrite_mlp, fuse_loss")
    monkeypatch.setenv("LECOMPILE_DUMP_DIR", "/tmp/dumps")
    config = LongExposureConfig.from_env(svd_rank=4)
    assert (config.mlp_density, config.predictor, config.disable, config.tuning.svd_rank) == (
        0.25, "oracle", {"rewrite_mlp", "fuse_loss"}, 4)
    assert config.resolved_dump_dir() == "/tmp/dumps"
    assert LongExposureConfig().resolved_dump_dir() == "/tmp/dumps"


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("LECOMPILE_TILE_SIZE", "big")
    with pytest.raises(ValueError, match="LECOMPILE_TILE_SIZE='big' is not a valid int"):
        LongExposureConfig.from_env()


def test_replace_validates():
    assert LongExposureConfig().replace(mlp_density=0.3).mlp_density == 0.3
    with pytest.raises(ValueError, match="mlp_density"):
        LongExposureConfig().replace(mlp_density=0)


def test_settings_parse_to_typed_fields():
    values = LongExposureConfig.parse_settings(["svd_rank=16", "disable = fuse_loss", "mlp_layer_densities=1,1,0.5"])
    assert values == {"svd_rank": 16, "disable": {"fuse_loss"}, "mlp_layer_densities": (1.0, 1.0, 0.5)}
    assert LongExposureConfig.create(**values).tuning.svd_rank == 16


@pytest.mark.parametrize("item,message", [
    ("svd_rank", r"'svd_rank' is not NAME=VALUE"),
    ("rank=16", r"'rank=16' is not NAME=VALUE with NAME one of \[.*'svd_rank'"),
    ("svd_rank=big", r"svd_rank='big' is not a valid int"),
])
def test_bad_settings_name_themselves(item, message):
    with pytest.raises(ValueError, match=message):
        LongExposureConfig.parse_settings([item])


def test_numpy_and_tensor_densities_are_numbers():
    np = pytest.importorskip("numpy")
    import torch
    config = LongExposureConfig(mlp_density=np.float32(0.5), attn_density=torch.tensor(0.25),
                                mlp_layer_densities=(np.float64(1.0), 0.5))
    assert (config.mlp_density, config.attn_density, config.mlp_layer_densities) == (0.5, 0.25, (1.0, 0.5))
    assert type(config.mlp_density) is float and type(config.attn_density) is float
    with pytest.raises(ValueError, match=r"mlp_density must be a number in \(0, 1\], got tensor"):
        LongExposureConfig(mlp_density=torch.tensor([0.5, 0.5]))


def test_misspelt_environment_variable_is_an_error(monkeypatch):
    monkeypatch.setenv("LECOMPILE_MLP_DENSITYY", "0.25")
    with pytest.raises(ValueError, match="LECOMPILE_MLP_DENSITYY is not a lecompile setting; did you mean "
                                         "LECOMPILE_MLP_DENSITY"):
        LongExposureConfig.from_env()
