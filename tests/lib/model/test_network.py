"""The fusion head's architecture and inference: inputs per modality, the lexical switch, softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.model.network import FusionConfig, MultimodalMLP, softmax
from lib.model.train import TrainConfig, configs_from_trial
from tests.lib.model.test_train import TRIAL


def test_single_modality_heads_read_only_their_input():
    config = FusionConfig(text_dim=8, image_dim=6, n_classes=3, hidden=(4, 4, 4), modality="image")
    model = MultimodalMLP(config).eval()
    image = torch.randn(5, 6)
    out_a = model(torch.randn(5, 8), image)
    out_b = model(torch.randn(5, 8), image)
    assert torch.equal(out_a, out_b) and out_a.shape == (5, 3)


def test_lexical_proj_zero_turns_the_branch_off():
    model_config, _ = configs_from_trial(
        {**TRIAL, "lexical_proj": 0}, 8, 6, 4, TrainConfig(), lexical_dim=100
    )
    assert not model_config.uses_lexical and model_config.input_dim == 14
    assert MultimodalMLP(model_config).lexical is None
    with pytest.raises(ValueError, match="lexical"):
        FusionConfig(text_dim=8, image_dim=6, n_classes=3, modality="lexical")


def test_softmax_uses_the_temperature_and_is_stable():
    logits = np.array([[2.0, 1.0, 0.0]])
    p = softmax(logits)
    assert p.sum() == pytest.approx(1.0) and p[0, 0] > p[0, 1] > p[0, 2]
    assert softmax(logits, 2.0)[0, 0] < p[0, 0]  # a higher temperature flattens
    assert np.isfinite(softmax(np.array([[1000.0, -1000.0]]))).all()
