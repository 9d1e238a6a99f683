"""DoRA on linear layers (layers/dora.py): the maths against a direct formula, merging, gradients,
both forward paths (the Function and plain autograd), mixed batches and the refusals.

The direct formula, for W (out, in), ΔW = s · B A, m (out,) and n = ||W + ΔW||_row (detached):

    y = (m / n) ⊙ ((W + ΔW) x) + b                                   dropout 0 or eval
    y = W x + b + (m / n - 1) ⊙ (W x̃) + (m / n) ⊙ (ΔW x̃)           training with dropout (PEFT's)
"""

import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import ConfigError, LoraConfig, dispatch, get_peft_model
from lorakit.layers import AdapterSpec, autograd, dora

from conftest import checkpointing_on, tiny_gpt2, tiny_llama

TOL = 1e-5


def assert_close(actual, expected, tol=TOL, msg=""):
    """|actual - expected| <= tol * max(1, max |expected|), everywhere."""
    scale = max(1.0, expected.abs().max().item())
    error = (actual.float() - expected.float()).abs().max().item()
    assert actual.shape == expected.shape and error <= tol * scale, f"{msg}: error {error:.3g}, scale {scale:.3g}"


def dora_layer(base, names=("d",), r=4, alpha=8.0, dropout=0.0, use_dora=(True,)):
    """A wrapped layer with random factors and a perturbed magnitude, base frozen, adapters trainable."""
    torch.manual_seed(0)
    layer = dispatch.wrap(base, LoraConfig())
    for name, dora_on in zip(names, use_dora * len(names) if len(use_dora) == 1 else use_dora):
        layer.add_adapter(name, AdapterSpec(r=r, alpha=alpha, dropout=dropout, variant="dora" if dora_on else "lora"), init=False)
        if dora_on:
            with torch.no_grad():
                layer.lora_magnitude_vector[name].weight.mul_(1 + 0.3 * torch.rand(layer.out_features))
    layer.set_active(list(names))
    layer.requires_grad_(False)
    for name in names:
        for p in layer.adapter_parameters(name):
            p.requires_grad_(True)
    return layer


def linear_base(bias=True):
    torch.manual_seed(1)
    return nn.Linear(12, 10, bias=bias)


def conv1d_base():
    torch.manual_seed(1)
    base = Conv1D(10, 12)  # weight (in=12, out=10)
    nn.init.normal_(base.weight, std=0.3)
    nn.init.normal_(base.bias, std=0.1)
    return base


BASES = {"linear": linear_base, "linear-no-bias": lambda: linear_base(bias=False), "conv1d": conv1d_base}


def direct(layer, name, x, x_dropped=None):
    """The direct formula (module docstring), from W, A, B, m in float64."""
    w = layer.weight_out_in().double()  # (out, in)
    a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
    s = layer.adapters[name].scaling
    combined = w + s * b @ a  # (out, in)
    scale = layer.lora_magnitude_vector[name].weight.double() / combined.norm(dim=1).detach()  # (out,)
    bias = layer.base_layer.bias
    bias = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    x = x.double()
    if x_dropped is None:
        return scale * (x @ combined.T) + bias
    x_dropped = x_dropped.double()
    return x @ w.T + bias + (scale - 1) * (x_dropped @ w.T) + scale * (x_dropped @ (s * b @ a).T)


@pytest.mark.parametrize("path", autograd.PATHS)
@pytest.mark.parametrize("kind", sorted(BASES))
def test_forward_matches_the_direct_formula(kind, path):
    layer = dora_layer(BASES[kind]())
    x = torch.randn(3, 5, 12)
    expected = direct(layer, "d", x)
    for train in (True, False):
        layer.train(train)
        with autograd.lora_path(path):
            assert_close(layer(x), expected, msg=f"{kind} {path} train={train}")
        with torch.no_grad(), autograd.lora_path(path):
            assert_close(layer(x), expected, msg=f"{kind} {path} no_grad train={train}")


@pytest.mark.parametrize("path", autograd.PATHS)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_with_dropout_is_pefts_formula(kind, path):
    """Training with dropout: the rescaled base part reads the dropped input (PEFT, the paper's code)."""
    p = 0.3
    layer = dora_layer(BASES[kind](), dropout=p).train()
    x = torch.randn(4, 12)
    torch.manual_seed(9)
    seed = autograd.draw_seed()  # the draw the layer makes for its one adapter
    expected = direct(layer, "d", x, x_dropped=autograd.seeded_dropout(x, p, seed))
    torch.manual_seed(9)
    with autograd.lora_path(path):
        assert_close(layer(x), expected, msg=f"{kind} {path}")


def test_new_adapter_starts_as_the_base_with_pefts_magnitude():
    """Default init (B = 0): m = ||W||_row, and the model computes what the base computes."""
    base = tiny_llama()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        expected = base(ids).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert_close(layer.lora_magnitude_vector["default"].weight, layer.base_layer.weight.norm(dim=1), tol=1e-6)
    with torch.no_grad():
        assert_close(model(ids).logits, expected, tol=1e-6)


@pytest.mark.parametrize("kind", sorted(BASES))
def test_gradients_reach_magnitude_and_factors_and_match_autograd_of_the_formula(kind):
    layer = dora_layer(BASES[kind]()).train()
    x = torch.randn(2, 6, 12, requires_grad=True)
    weights = {"m": layer.lora_magnitude_vector["d"].weight, "A": layer.lora_A["d"].weight,
               "B": layer.lora_B["d"].weight}
    w, bias = layer.weight_out_in(), layer.base_layer.bias
    s = layer.adapters["d"].scaling

    def formula():
        combined = w + s * weights["B"] @ weights["A"]
        scale = weights["m"] / combined.norm(dim=1).detach()
        return scale * (x @ combined.T) + (0 if bias is None else bias)

    g = torch.randn(2, 6, 10)
    expected = torch.autograd.grad(formula(), [x, *weights.values()], g)
    for path in autograd.PATHS:
        with autograd.lora_path(path):
            actual = torch.autograd.grad(layer(x), [x, *weights.values()], g)
        for name, got, want in zip(["x", *weights], actual, expected):
            assert want.abs().max() > 0, name  # gradients flow
            assert_close(got, want, msg=f"{kind} {path} d{name}")


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])  # the base product in the Function, or the base's output
def test_function_and_plain_paths_agree_with_a_trainable_bias(kind, dropout):
    """Same seeds, same dropped elements: outputs and every gradient (x, m, A, B, base bias) agree."""
    layer = dora_layer(BASES[kind](), dropout=dropout).train()
    layer.base_layer.bias.requires_grad_(True)
    params = [layer.base_layer.bias, *layer.adapter_parameters("d")]
    x = torch.randn(3, 4, 12, requires_grad=True)
    g = torch.randn(3, 4, 10)
    results = []
    for path in autograd.PATHS:
        torch.manual_seed(4)
        with autograd.lora_path(path):
            y = layer(x)
        results.append((y, *torch.autograd.grad(y, [x, *params], g)))
    for got, want in zip(*results):
        assert_close(got, want, tol=1e-6)


def test_dora_after_a_lora_adapter_in_one_layer():
    """Two active adapters, LoRA then DoRA: DoRA rescales everything before it (PEFT's order)."""
    layer = dora_layer(linear_base(), names=("l", "d"), use_dora=(False, True)).eval()
    x = torch.randn(5, 12)
    w, bias = layer.weight_out_in(), layer.base_layer.bias
    total = w + layer.delta_weight("l") + layer.delta_weight("d")
    scale = layer.lora_magnitude_vector["d"].weight / (w + layer.delta_weight("d")).norm(dim=1)
    expected = scale * (x @ total.T) + bias
    for path in autograd.PATHS:
        with torch.no_grad(), autograd.lora_path(path):
            assert_close(layer(x), expected, msg=path)


# --- merging -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(BASES))
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    layer = dora_layer(BASES[kind]()).eval()
    x = torch.randn(4, 12)
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        expected = layer(x)
        layer.merge(["d"])
        assert_close(layer(x), expected)
        assert_close(layer.merged_weight([]), layer.base_layer.weight, tol=0)  # merged: W itself
        layer.unmerge()
        assert_close(layer.base_layer.weight, original, tol=1e-6)
        assert layer.lora_magnitude_vector["d"].merged_norm is None
        assert_close(layer(x), expected)


def test_merging_in_turn_equals_the_unmerged_layer():
    """LoRA merged first, DoRA next (its n from the unmerged W, as the forward), then both out."""
    layer = dora_layer(linear_base(), names=("l", "d", "e"), use_dora=(False, True, True)).eval()
    layer.set_active(["l", "d"])
    x = torch.randn(4, 12)
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        expected = layer(x)
        layer.merge(["l"])
        layer.merge(["d"])
        assert_close(layer(x), expected)
        layer.unmerge()
        assert_close(layer.base_layer.weight, original, tol=1e-6)


def test_model_merge_and_unload_and_disable_adapter():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], use_dora=True,
                                                   init_lora_weights=False))
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.1)
        expected = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
        model.merge_adapter()
        assert_close(model(ids).logits, expected)
        with model.disable_adapter():  # unmerges, runs the base, merges again
            assert_close(model(ids).logits, base)
        assert_close(model(ids).logits, expected)
        merged = model.merge_and_unload()
        assert_close(merged(ids).logits, expected)


# --- models, batches, files ------------------------------------------------------------------------

def test_trains_under_gradient_checkpointing():
    """Checkpointing recomputes the forward (and its norm): same gradients as without."""
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                        use_dora=True, init_lora_weights=False)).train()
        if checkpointing:
            checkpointing_on(model)
        ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert any(".lora_magnitude_vector." in n for n in grads[0])
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], tol=1e-6, msg=name)


def test_mixed_batch_rows_match_their_adapters_alone():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True,
                                                    init_lora_weights=False))
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["v_proj", "o_proj"], init_lora_weights=False))
    model.eval()
    ids = torch.randint(0, 100, (3, 6))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.1)
        alone = {}
        for name in ("default", "lora"):
            model.set_adapter(name)
            alone[name] = model(ids).logits
        with model.disable_adapter():
            alone["__base__"] = model(ids).logits
        mixed = model(ids, adapter_names=["lora", "default", "__base__"]).logits
    for row, name in enumerate(["lora", "default", "__base__"]):
        assert_close(mixed[row], alone[name][row], msg=name)


def test_save_and_load_round_trip(tmp_path):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_proj"], use_dora=True))
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.1)
        expected = model.eval()(ids).logits
    model.save_pretrained(tmp_path)
    config, tensors = lorakit.adapter_format.read_adapter(tmp_path)
    assert config.use_dora
    magnitudes = {k: t for k, t in tensors.items() if "lora_magnitude_vector" in k}
    assert len(magnitudes) == 6 and all(t.shape in ((96,), (32,)) for t in magnitudes.values())  # c_attn, 2 c_proj
    loaded = lorakit.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path))
    with torch.no_grad():
        assert_close(loaded(ids).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode


def test_bfloat16_base_keeps_float32_magnitude_and_runs():
    model = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                                       use_dora=True, lora_dropout=0.1))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    ids = torch.randint(0, 100, (2, 7))
    for path in autograd.PATHS:
        model.train()
        with autograd.lora_path(path):
            model(ids, labels=ids).loss.backward()
        assert torch.isfinite(layer.lora_magnitude_vector["default"].weight.grad).all()
        model.zero_grad()


# --- refusals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("base, name", [(lambda: nn.Embedding(10, 8), "Embedding"),
                                        (lambda: nn.Conv2d(3, 4, 3), "Conv2d")])
def test_dora_refused_on_layers_without_it(base, name):
    module = nn.ModuleDict({"target": base()})
    with pytest.raises(ValueError, match=rf"target: DoRA \(use_dora=True\) is not implemented .* {name}"):
        get_peft_model(module, LoraConfig(target_modules=["target"], use_dora=True))
    assert type(module["target"]).__name__ == name  # left as it was


def test_dora_refused_on_a_4bit_base():
    model = tiny_llama()
    with pytest.raises(ValueError, match="DoRA .* not implemented .* Linear4bit"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], use_dora=True), quantize="nf4")


def test_config_refuses_dora_with_lora_bias_and_round_trips():
    with pytest.raises(ConfigError, match="lora_bias=True is not supported with use_dora=True"):
        LoraConfig(use_dora=True, lora_bias=True)
    config = LoraConfig(use_dora=True, target_modules=["q_proj"])
    assert LoraConfig.from_dict(config.to_dict()) == config


def test_combining_dora_adapters_is_refused():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"\['default'\] use DoRA"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "sum", combination_type="cat")


def test_weight_norm_is_the_row_norm_of_w_plus_delta():
    torch.manual_seed(0)
    w, a, b = torch.randn(7, 5), torch.randn(3, 5), torch.randn(7, 3)
    expected = torch.linalg.norm(w + 0.5 * b @ a, dim=1)
    assert_close(dora.weight_norm(w, a, b, 0.5), expected, tol=1e-6)
    assert_close(dora.weight_norm(w.to(torch.bfloat16), a, b, 0.5),
                 torch.linalg.norm(w.to(torch.bfloat16).float() + 0.5 * b @ a, dim=1), tol=1e-6)
    assert not dora.weight_norm(w, a.requires_grad_(), b, 0.5).requires_grad


def test_a_trained_base_weight_gets_its_gradient():
    """An unfrozen base weight (not lorakit's default) takes the plain path, which carries dW."""
    layer = dora_layer(linear_base()).train()
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(3, 12)
    w, a, b = layer.base_layer.weight, layer.lora_A["d"].weight, layer.lora_B["d"].weight
    s, m, bias = layer.adapters["d"].scaling, layer.lora_magnitude_vector["d"].weight, layer.base_layer.bias
    expected_y = (m / (w + s * b @ a).norm(dim=1).detach()) * (x @ (w + s * b @ a).T) + bias
    expected = torch.autograd.grad(expected_y.sum(), w)[0]
    for path in autograd.PATHS:
        with autograd.lora_path(path):
            assert_close(torch.autograd.grad(layer(x).sum(), w)[0], expected, msg=path)


def test_pissa_dora_adapter_converts_to_a_plain_init_dora_adapter(tmp_path):
    """W_res + s·B·A = W + s'·B'·A', so the norm, and the magnitude, carry over unchanged."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True,
                        init_lora_weights="pissa")
    model = get_peft_model(tiny_llama(), config)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    original = tiny_llama().model.layers[0].self_attn.q_proj.weight
    assert_close(layer.lora_magnitude_vector["default"].weight, original.norm(dim=1), tol=1e-5)  # ||W||
    model.save_pretrained(tmp_path / "init")
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.05)
        expected = model.eval()(ids).logits
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora"))
    assert loaded.peft_config["default"].use_dora and loaded.peft_config["default"].r == 8
    with torch.no_grad():
        assert_close(loaded(ids).logits, expected)
