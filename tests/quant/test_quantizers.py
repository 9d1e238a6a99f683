"""QUANTIZERS: every part of lorakit that meets a quantized layer asks the registry."""

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.layers import Linear
from lorakit.quant import QUANTIZERS, Linear4bit, Quantizer, registry

from conftest import tiny_llama


class HalfLinear(nn.Module):
    """A toy "quantized" linear layer: its weight kept in float16, frozen."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().half())
        self.bias = None

    def forward(self, x):
        return x @ self.weight.float().t()


def quantize_half(model, skip=(), **options):
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path not in skip:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, HalfLinear(module))
    return model


class HalfLinearLora(Linear):
    mergeable = False
    merge_refusal = "half layers are not merged"


def dequantize_half(lora_model, names, safe_merge=False, dtype=None):
    """The format's float layers: each wrapped toy layer's weight in float32 with its adapters added."""
    layers = {}
    for path, module in lora_model.model.named_modules():
        if isinstance(module, HalfLinearLora):
            linear = nn.Linear(module.in_features, module.out_features, bias=False)
            present = [n for n in names if n in module.adapters]
            with torch.no_grad():
                linear.weight.copy_(module.merged_weight(present))
            layers[path] = linear
    return layers


@pytest.fixture
def half_format():
    registry.register(Quantizer(name="half", layer_type=HalfLinear, quantize_model=quantize_half, wrap=HalfLinearLora,
                                dequantized_layers=dequantize_half,
                                weight_bytes=lambda numel, double_quant: 2 * numel,
                                logical_numel=lambda layer: layer.weight.numel()))
    yield QUANTIZERS["half"]
    del QUANTIZERS["half"]


def test_nf4_is_registered():
    assert QUANTIZERS["nf4"].layer_type is Linear4bit
    with pytest.raises(ValueError, match="quantize='int3' is not supported; choose one of \\('nf4',"):
        registry.get("int3")


def test_a_new_format_is_wrapped_targeted_counted_and_merged_through_the_registry(half_format):
    float_model = tiny_llama()
    total_float = sum(p.numel() for p in float_model.parameters())
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"), quantize="half")
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, HalfLinearLora) and isinstance(q_proj.base_layer, HalfLinear)
    assert len(model.peft_config["default"].target_modules) == 14  # "all-linear" found the toy layers
    trainable, total = model.get_nb_trainable_parameters()
    assert total == total_float + trainable  # each toy layer counted at its float size
    for _, layer in model.base_model.lora_layers():
        torch.nn.init.normal_(layer.lora_B["default"].weight)  # a real update to merge
    ids = torch.randint(0, 100, (1, 4))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    plain = model.merge_and_unload(dtype=torch.float32)  # the format's layers, put in by the model
    assert not any(isinstance(m, (HalfLinear, HalfLinearLora)) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
