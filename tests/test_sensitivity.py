"""Per-layer densities from the sensitivity pass."""

import pytest
import torch

from lecompile import LongExposureConfig
from lecompile.sensitivity import auto_layer_densities, layer_sensitivity

from models import ARCHS, LAYERS, VOCAB, tiny_model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sensitivity_covers_every_layer_and_densities_keep_the_mean(arch):
    model = tiny_model(arch, "lora")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    sensitivity = layer_sensitivity(model, ids, probe_density=0.1)
    assert sorted(sensitivity) == list(range(LAYERS))
    assert any(abs(v) > 0 for v in sensitivity.values()), "masking changed nothing: the test cannot fail"
    densities = auto_layer_densities(model, ids, 0.5, spread=0.5, probe_density=0.1)
    assert len(densities) == LAYERS and sum(densities) / LAYERS == pytest.approx(0.5)
    most_sensitive = max(sensitivity, key=sensitivity.get)
    assert densities[most_sensitive] == max(densities)
    assert model.training, "the pass restores train mode"
    LongExposureConfig(mlp_layer_densities=densities)  # valid config values


def test_bad_arguments_and_models_are_named():
    model = tiny_model("llama", "lora")
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="mean_density must be in"):
        auto_layer_densities(model, ids, 0.0)
    with pytest.raises(ValueError, match="no MLP down projection found"):
        layer_sensitivity(torch.nn.Sequential(torch.nn.Linear(2, 2)), ids)
