"""Forward, init and merge maths of each wrapper against the formulas, on random inputs."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import dispatch
from lorakit.config import LoraConfig
from lorakit.layers import AdapterSpec, Conv, Embedding, Linear


def wrapped(layer, r=4, alpha=8.0, init=False, **spec):
    lora = dispatch.wrap(layer, LoraConfig())
    lora.add_adapter("a", AdapterSpec(r=r, alpha=alpha, **spec), init=init)
    lora.set_active(["a"])
    return lora


def test_linear_forward_is_base_plus_scaled_ba():
    torch.manual_seed(0)
    lora = wrapped(nn.Linear(16, 12), r=4, alpha=8.0)
    x = torch.randn(3, 5, 16)
    a, b = lora.lora_A["a"].weight, lora.lora_B["a"].weight
    expected = lora.base_layer(x) + (x @ a.T @ b.T) * (8.0 / 4)
    torch.testing.assert_close(lora(x), expected, rtol=0, atol=1e-6)


def test_rslora_scaling():
    assert AdapterSpec(r=16, alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(16))
    assert AdapterSpec(r=16, alpha=8).scaling == 0.5


def test_default_init_is_kaiming_a_and_zero_b():
    torch.manual_seed(0)
    lora = wrapped(nn.Linear(64, 8), r=8, init=True)
    a, b = lora.lora_A["a"].weight, lora.lora_B["a"].weight
    assert a.abs().max() <= 1 / math.sqrt(64) and a.std() > 0
    assert torch.count_nonzero(b) == 0
    x = torch.randn(2, 64)
    torch.testing.assert_close(lora(x), lora.base_layer(x), rtol=0, atol=0)


def test_dropout_touches_only_lora_path():
    torch.manual_seed(0)
    lora = wrapped(nn.Linear(8, 8), dropout=0.5).train()
    with torch.no_grad():
        lora.lora_B["a"].weight.zero_()
    x = torch.randn(4, 8)
    torch.testing.assert_close(lora(x), lora.base_layer(x))  # B = 0: dropout had nothing to change
    lora.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        lora.lora_B["a"].weight.normal_()
    assert torch.equal(lora(x), lora(x))  # eval: deterministic


@pytest.mark.parametrize("make, inputs", [
    (lambda: nn.Linear(10, 6), lambda: torch.randn(3, 10)),
    (lambda: Conv1D(6, 10), lambda: torch.randn(3, 10)),  # GPT-2: weight (in=10, out=6)
    (lambda: nn.Embedding(20, 6, padding_idx=0), lambda: torch.randint(0, 20, (3, 5))),
    (lambda: nn.Conv2d(3, 5, 3, padding=1), lambda: torch.randn(2, 3, 7, 7)),
    (lambda: nn.Conv2d(3, 5, 1), lambda: torch.randn(2, 3, 4, 4)),
    (lambda: nn.Conv1d(3, 5, 3, stride=2), lambda: torch.randn(2, 3, 11)),
])
def test_merge_equals_unmerged_and_unmerge_restores(make, inputs):
    torch.manual_seed(0)
    lora = wrapped(make(), r=3, alpha=6.0, lora_bias=False)
    if isinstance(lora, Embedding):
        with torch.no_grad():
            lora.lora_embedding_A["a"].normal_()
    x = inputs()
    base_weight = lora.base_weight.detach().clone()
    unmerged = lora(x)
    lora.merge(["a"])
    torch.testing.assert_close(lora(x), unmerged, rtol=1e-5, atol=1e-5)
    lora.unmerge()
    torch.testing.assert_close(lora.base_weight, base_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(lora(x), unmerged, rtol=1e-5, atol=1e-5)


def test_dispatch_types_and_refusals():
    assert isinstance(dispatch.wrap(nn.Linear(2, 2), LoraConfig()), Linear)
    assert isinstance(dispatch.wrap(Conv1D(2, 2), LoraConfig()), Linear)
    assert isinstance(dispatch.wrap(nn.Embedding(4, 2), LoraConfig()), Embedding)
    assert isinstance(dispatch.wrap(nn.Conv2d(2, 2, 3), LoraConfig()), Conv)
    with pytest.raises(TypeError, match="LoRA cannot wrap a LayerNorm; supported layer types: .*Linear"):
        dispatch.wrap(nn.LayerNorm(4), LoraConfig())
    with pytest.raises(ValueError, match="groups=2"):
        dispatch.wrap(nn.Conv2d(4, 4, 3, groups=2), LoraConfig())


def test_registering_a_new_layer_type():
    class MyLinear(nn.Linear):
        pass

    calls = []
    dispatch.register(MyLinear, lambda layer, config: calls.append(layer) or Linear(layer))
    try:
        assert isinstance(dispatch.wrap(MyLinear(2, 2), LoraConfig()), Linear) and calls
    finally:
        dispatch._REGISTRY.pop(0)


def test_lora_bias_merges_into_base_bias():
    torch.manual_seed(0)
    lora = wrapped(nn.Linear(6, 4), lora_bias=True)
    with torch.no_grad():
        lora.lora_B["a"].bias.normal_()
    x = torch.randn(2, 6)
    unmerged = lora(x)
    lora.merge(["a"])
    torch.testing.assert_close(lora(x), unmerged, rtol=1e-5, atol=1e-6)
