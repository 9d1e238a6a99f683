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


@pytest.fixture
def half_format():
    registry.register(Quantizer(name="half", layer_type=HalfLinear, quantize_model=quantize_half, wrap=HalfLinearLora,
                                merge_and_unload=lambda lora_model, *a, **k: "merged by the format",
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
    assert model.merge_and_unload() == "merged by the format"
    ids = torch.randint(0, 100, (1, 4))
    assert model(input_ids=ids).logits.shape == (1, 4, 100)
