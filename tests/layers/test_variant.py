"""The variant seam (layers/variant.py): a new variant is one subclass plus a registration, and
every layer path (forward, training Function path, mixed batches, merge/unmerge, save/load)
reaches it without knowing it.

The toy variant here is a per-output-row gate g (out,), trainable, starting at 1:

    y = base(x) + g ⊙ (s · B A x),     merged: W' = W + g ⊙_row ΔW
"""

import dataclasses

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.layers import VARIANTS, LoraVariant, choose_variant, register_variant
from lorakit.layers.variant import PLAIN

from conftest import tiny_llama


class Gate(nn.Module):
    def __init__(self, out_features, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))


class GatedVariant(LoraVariant):
    name = "gated"
    title = "Gated LoRA"
    containers = ("lora_gate",)

    def selected_by(self, config):
        return getattr(config, "use_gate", False)

    def check(self, layer):
        if not hasattr(layer, "out_features"):
            raise ValueError(f"gated LoRA needs a linear layer, not {type(layer.base_layer).__name__}")

    def create(self, layer, name, spec, device, dtype):
        layer.variant_store("lora_gate")[name] = Gate(layer.out_features, device=device, dtype=dtype)

    def delta(self, layer, x, name, result):
        return layer.lora_delta(x, name) * layer.lora_gate[name].weight  # (..., out)

    def linear_forward(self, layer, x, name, result):
        result = layer.base_layer(x) if result is None else result
        return result + self.delta(layer, x, name, result).to(result.dtype)

    def merge(self, layer, name, weight, unmerged, commit):
        return weight + layer.lora_gate[name].weight.detach().float()[:, None] * layer.delta_weight(name)

    def unmerge(self, layer, name, weight, commit):
        return weight - layer.lora_gate[name].weight.detach().float()[:, None] * layer.delta_weight(name)


@dataclasses.dataclass
class GatedConfig(LoraConfig):
    use_gate: bool = True


@pytest.fixture
def gated(monkeypatch):
    monkeypatch.setitem(VARIANTS, "gated", GatedVariant())  # (removed again after the test)


def perturbed_model(config):
    model = get_peft_model(tiny_llama(), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def test_the_config_chooses_the_variant(gated):
    assert choose_variant(LoraConfig()) == PLAIN
    assert choose_variant(LoraConfig(use_dora=True)) == "dora"
    assert choose_variant(GatedConfig()) == "gated"
    with pytest.raises(ValueError, match="several LoRA variants"):
        choose_variant(GatedConfig(use_dora=True))
    with pytest.raises(ValueError, match="already registered"):
        register_variant(GatedVariant())  # another object under a taken name


def test_a_registered_variant_runs_in_every_path(gated, tmp_path):
    model = perturbed_model(GatedConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.adapters["default"].variant == "gated"
    assert "lora_gate" in dict(layer.named_children())
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        assert (out - base).abs().max() > 1e-3  # the gate and factors act

        # the plain path and the formula agree with the Linear's own path
        x = torch.randn(3, 32)
        expected = layer.base_layer(x) + layer.lora_gate["default"].weight * layer.lora_delta(x, "default")
        assert torch.allclose(layer(x), expected, atol=1e-6)

        # a mixed batch routes each row through its own adapter
        mixed = model(input_ids=ids, adapter_names=["default", "__base__"]).logits
        assert torch.allclose(mixed[0], out[0], atol=1e-5) and torch.allclose(mixed[1], base[1], atol=1e-5)

        # merge and unmerge go through the variant
        model.merge_adapter()
        assert torch.allclose(model(input_ids=ids).logits, out, atol=1e-4)
        model.unmerge_adapter()
        assert torch.allclose(model(input_ids=ids).logits, out, atol=1e-5)

    # gradients reach the gate
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert layer.lora_gate["default"].weight.grad.abs().sum() > 0

    # its state keys save and load like lora_A / lora_B
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_gate.weight" in keys
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.peft_config["default"]
    reloaded = get_peft_model(tiny_llama(), dataclasses.replace(config))
    reloaded.load_adapter(str(tmp_path), "default")
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in state.items() if "lora_gate" in k)


def test_a_variant_refusing_a_layer_changes_nothing(gated):
    module = nn.ModuleDict({"target": nn.Embedding(10, 8)})
    with pytest.raises(ValueError, match="target: gated LoRA needs a linear layer, not Embedding"):
        get_peft_model(module, GatedConfig(target_modules=["target"]))
    assert type(module["target"]) is nn.Embedding


def test_adapter_parameters_and_delete_cover_the_variant_containers(gated):
    model = perturbed_model(GatedConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("plain", LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert [p.shape for p in layer.adapter_parameters("default")] == [(4, 32), (32, 4), (32,)]
    model.set_adapter("plain")
    model.delete_adapter("default")
    assert "default" not in layer.lora_gate and "default" not in layer.lora_A
    assert isinstance(model, PeftModel)
