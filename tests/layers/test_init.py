"""PiSSA and OLoRA inits (lorakit.layers.init) and the conversion to plain LoRA (lorakit.convert)."""

import json
import re

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import AdapterLoadError, ConfigError, LoraConfig, PeftModel, get_peft_model
from lorakit.convert import ConversionError, convert_to_lora
from lorakit.layers import AdapterSpec, Linear, LoraLayer
from lorakit.layers import init as weight_init

from conftest import logits, perturb_trainables, tiny_gpt2, tiny_llama

WEIGHT_INITS = ["pissa", "pissa_niter_3", "olora"]


def wrapped(layer, r=4, alpha=8.0, init="pissa", **spec):
    lora = Linear(layer)
    lora.add_adapter("a", AdapterSpec(r=r, alpha=alpha, **spec), init=init)
    lora.set_active(["a"])
    return lora


@pytest.mark.parametrize("init", WEIGHT_INITS)
@pytest.mark.parametrize("make, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])],
                         ids=["llama", "gpt2-conv1d"])
def test_initial_model_equals_base_model(make, targets, init, ids):
    """residual + scaling·B·A = W, so the freshly initialised model is the base model (fp32, 1e-5)."""
    expected = logits(make(), ids)
    model = get_peft_model(make(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init))
    assert (logits(model, ids) - expected).abs().max() <= 1e-5
    original = dict(make().named_parameters())
    for path, layer in model.base_model.lora_layers():
        weight = original[path + ".weight"].detach()
        rebuilt = layer.base_layer.weight.detach() + layer.delta_weight("default")
        torch.testing.assert_close(rebuilt, weight, rtol=0, atol=1e-5)
        assert not torch.allclose(layer.base_layer.weight, weight)  # W itself was replaced by the residual


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_factors_are_the_scaled_top_singular_triplets(use_rslora):
    torch.manual_seed(0)
    lora = wrapped(nn.Linear(12, 10), r=3, alpha=6.0, use_rslora=use_rslora)
    w = lora.base_layer.weight.detach() + lora.delta_weight("a")  # the original W: (10, 12)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    scaling = lora.adapters["a"].scaling
    a, b = lora.lora_A["a"].weight.detach(), lora.lora_B["a"].weight.detach()
    torch.testing.assert_close(scaling * b @ a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], rtol=0, atol=1e-5)
    torch.testing.assert_close(a @ a.T, torch.diag(s[:3] / scaling), rtol=0, atol=1e-5)  # rows: sqrt(S/s)·V^T
    torch.testing.assert_close(b.T @ b, torch.diag(s[:3] / scaling), rtol=0, atol=1e-5)
    # the residual holds the remaining spectrum (and three zeros)
    residual = torch.linalg.svdvals(lora.base_layer.weight.detach())  # (10,)
    torch.testing.assert_close(residual, torch.cat([s[3:], torch.zeros(3)]), rtol=0, atol=1e-5)


def test_olora_factors_are_the_first_qr_columns_and_transpose_for_conv1d():
    torch.manual_seed(0)
    weight = torch.randn(12, 10)  # (out, in)
    linear = nn.Linear(10, 12, bias=False)
    conv1d = Conv1D(12, 10)  # stores (in, out)
    with torch.no_grad():
        linear.weight.copy_(weight)
        conv1d.weight.copy_(weight.T)
    q, r = torch.linalg.qr(weight)
    for layer in (linear, conv1d):
        lora = wrapped(layer, r=3, init="olora")
        a, b = lora.lora_A["a"].weight.detach(), lora.lora_B["a"].weight.detach()
        torch.testing.assert_close(b, q[:, :3], rtol=0, atol=1e-6)
        torch.testing.assert_close(a, r[:3], rtol=0, atol=1e-6)
        torch.testing.assert_close(b.T @ b, torch.eye(3), rtol=0, atol=1e-5)
        x = torch.randn(5, 10)
        torch.testing.assert_close(lora(x), x @ weight.T, rtol=0, atol=1e-5)


def test_float64_base_is_decomposed_in_float64():
    torch.manual_seed(0)
    layer = nn.Linear(9, 7, dtype=torch.float64)
    weight = layer.weight.detach().clone()
    lora = wrapped(layer, r=2)
    assert lora.lora_A["a"].weight.dtype == torch.float64
    delta = lora.adapters["a"].scaling * lora.lora_B["a"].weight @ lora.lora_A["a"].weight  # (7, 9) in float64
    torch.testing.assert_close(lora.base_layer.weight + delta, weight, rtol=0, atol=1e-12)


def test_weight_init_names():
    assert [weight_init.rewrites_base_weight(v) for v in ("pissa", "olora", "pissa_niter_4", True, "gaussian")] == \
        [True, True, True, False, False]
    assert LoraConfig(init_lora_weights="pissa_niter_16").init_lora_weights == "pissa_niter_16"
    for bad in ("pissa_niter_0", "pissa_niter_", "pissa_niter_x", "PiSSA", 1):
        with pytest.raises(ConfigError, match="init_lora_weights"):
            LoraConfig(init_lora_weights=bad)
    with pytest.raises(ConfigError, match="lora_bias=True needs init_lora_weights True or False"):
        LoraConfig(lora_bias=True, init_lora_weights="pissa")


@pytest.mark.parametrize("targets, fragment", [
    (["q_proj", "embed_tokens"], "embed_tokens: init_lora_weights='pissa' is supported on linear layers only, "
                                 "not on Embedding"),
    (["q_proj", "down_proj"], "layers.1.mlp.down_proj: init_lora_weights='pissa': r=40 exceeds min(in, out) = 32"),
])
def test_refusals_leave_the_model_unchanged(targets, fragment):
    """Every target is checked before the first base weight is rewritten (q_proj would be fine)."""
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(fragment)):
        get_peft_model(base, LoraConfig(r=4, rank_pattern={r"layers\.1\.mlp\.down_proj": 40}, target_modules=targets,
                                        init_lora_weights="pissa"))
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_conv_layer_is_refused():
    from lorakit.layers import Conv

    lora = Conv(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="init_lora_weights='olora' is supported on linear layers only"):
        lora.add_adapter("a", AdapterSpec(r=2, alpha=2), init="olora")
    assert not lora.adapters


def test_meta_device_base_is_left_alone():
    with torch.device("meta"):
        base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj"]))
    assert model.get_nb_trainable_parameters()[0] > 0


# --- conversion to plain LoRA ----------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("extra", [{}, dict(use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}),
                                   dict(bias="all")], ids=["plain", "rslora-patterns", "bias-all"])
def test_converted_adapter_on_the_original_base_reproduces_the_trained_model(init, extra, tmp_path, ids):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=init,
                        **extra)
    make = lambda: tiny_llama(attention_bias=True)  # noqa: E731  (biases for bias="all" to train)
    model = get_peft_model(make(), config)
    model.save_pretrained(tmp_path / "init")
    perturb_trainables(model)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "trained")
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    convert_to_lora(tmp_path / "trained", tmp_path / "init", tmp_path / "lora-from-files")
    for folder in ("lora", "lora-from-files"):
        data = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert data["r"] == 8 and data["init_lora_weights"] is True
        converted = PeftModel.from_pretrained(make(), str(tmp_path / folder))
        assert (logits(converted, ids) - expected).abs().max() <= 1e-5
        converted.merge_adapter()  # and it merges into the original weights like any LoRA adapter
        assert (logits(converted, ids) - expected).abs().max() <= 1e-5


def test_conversion_refuses_a_mismatched_initial_adapter(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "trained")
    other = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    other.save_pretrained(tmp_path / "r2")
    with pytest.raises(ConversionError, match="r=2 vs 4"):
        convert_to_lora(tmp_path / "trained", tmp_path / "r2", tmp_path / "out")
    with pytest.raises(AdapterLoadError, match="does not exist"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="would overwrite an input"):
        convert_to_lora(tmp_path / "trained", tmp_path / "r2", tmp_path / "trained")
    assert not (tmp_path / "out").exists()
