"""The LoRA training path (layers/autograd.py) against the plain autograd path it replaces.

Every test compares the two paths on random inputs: outputs and the gradients of every input
(x, A, B, lora_B's bias, a trainable base bias) to 1e-6 in float32 (relative to the tensor's
largest entry: the paths sum the same terms in another order), dropout included (both paths
draw the same seeds after the same `torch.manual_seed`). No timings here: see benchmarks/.
"""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, dispatch, get_peft_model
from lorakit.layers import AdapterSpec, autograd

from conftest import checkpointing_on, tiny_gpt2, tiny_llama



def assert_close(actual, expected, tol=1e-6, msg=""):
    """|actual - expected| <= tol * max(1, max |expected|), everywhere."""
    scale = max(1.0, expected.abs().max().item())
    error = (actual.float() - expected.float()).abs().max().item()
    assert actual.shape == expected.shape and error <= tol * scale, f"{msg}: error {error:.3g}, scale {scale:.3g}"


class SubLinear(nn.Linear):
    """An nn.Linear subclass: the Function adds to its output instead of running its product."""


def hooked_linear(*shape):
    """An nn.Linear with a forward hook (which must run): the Function adds to its output too."""
    layer = nn.Linear(*shape)
    layer.register_forward_hook(lambda module, inputs, output: output * 1.5)
    return layer


def wrapped(layer, names=("a",), r=4, alpha=8.0, dropout=0.0, lora_bias=False):
    lora = dispatch.wrap(layer, LoraConfig())
    for i, name in enumerate(names):
        lora.add_adapter(name, AdapterSpec(r=r + i, alpha=alpha, dropout=dropout, lora_bias=lora_bias), init=False)
        if lora_bias:
            nn.init.normal_(lora.lora_B[name].bias)
    lora.set_active(list(names))
    for p in lora.parameters():
        p.requires_grad_("lora_" in str(id(p)) or p is not lora.base_layer.weight)
    lora.base_layer.weight.requires_grad_(False)
    if getattr(lora.base_layer, "bias", None) is not None:
        lora.base_layer.bias.requires_grad_(False)
    return lora.train()


def run(path, lora, x, seed=0):
    """Output and gradients (of x and of every trainable parameter) on one path."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)
    with autograd.lora_path(path):
        out = lora(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in lora.named_parameters() if p.requires_grad}
    for p in lora.parameters():
        p.grad = None
    if x.requires_grad:
        grads["x"] = x.grad
    return out.detach(), grads


def assert_paths_agree(lora, x):
    out_plain, grads_plain = run("plain", lora, x)
    out_fn, grads_fn = run("function", lora, x)
    assert_close(out_fn, out_plain, msg="output")
    assert grads_fn.keys() == grads_plain.keys() and grads_fn
    for name in grads_plain:
        assert_close(grads_fn[name], grads_plain[name], msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("make", [lambda: nn.Linear(24, 20), lambda: SubLinear(24, 20), lambda: hooked_linear(24, 20),
                                  lambda: Conv1D(20, 24)], ids=["linear", "subclass", "hooked", "conv1d"])
@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("base_bias_trains", [False, True])
def test_layer_gradients_equal_plain_path(dropout, make, lora_bias, base_bias_trains):
    torch.manual_seed(0)
    lora = wrapped(make(), dropout=dropout, lora_bias=lora_bias)
    lora.base_layer.bias.requires_grad_(base_bias_trains)
    assert_paths_agree(lora, torch.randn(3, 7, 24, requires_grad=True))


def test_two_active_adapters_and_inputs_without_grad():
    torch.manual_seed(0)
    lora = wrapped(nn.Linear(16, 12), names=("a", "b"), dropout=0.2)
    assert_paths_agree(lora, torch.randn(2, 5, 16, requires_grad=True))
    assert_paths_agree(lora, torch.randn(2, 5, 16))  # only A and B need gradients


def test_frozen_adapter_still_passes_input_gradients():
    torch.manual_seed(0)
    lora = wrapped(nn.Linear(16, 12), dropout=0.2)
    for p in lora.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    _, plain = run("plain", lora, x)
    _, fn = run("function", lora, x)
    assert_close(fn["x"], plain["x"], msg="x")


def llama_grads(path, dtype=torch.float32, dropout=0.1, checkpointing=False, recompute=True, monkeypatch=None):
    model = tiny_llama(0).to(dtype)
    if checkpointing:
        checkpointing_on(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout,
                                             init_lora_weights=False)).train()
    embeds = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
    torch.manual_seed(5)
    if monkeypatch is not None:
        monkeypatch.setattr(autograd, "RECOMPUTE_INPUTS", recompute)
    with autograd.lora_path(path):
        logits = model(inputs_embeds=embeds).logits
        logits.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads["inputs_embeds"] = embeds.grad
    return logits.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("recompute", [True, False])
def test_llama_all_linear_gradients_equal_plain_path(dropout, checkpointing, recompute, monkeypatch):
    out_plain, plain = llama_grads("plain", dropout=dropout, checkpointing=checkpointing)
    out_fn, fn = llama_grads("function", dropout=dropout, checkpointing=checkpointing, recompute=recompute,
                             monkeypatch=monkeypatch)
    assert_close(out_fn, out_plain, msg="logits")
    assert fn.keys() == plain.keys() and len(fn) == 2 * 7 * 2 + 1
    for name in plain:
        assert_close(fn[name], plain[name], msg=name)


def test_llama_bf16_gradients_equal_plain_path_to_bf16_rounding():
    out_plain, plain = llama_grads("plain", torch.bfloat16)
    out_fn, fn = llama_grads("function", torch.bfloat16)
    assert torch.equal(out_fn, out_plain)  # the same roundings, in the same order
    for name in plain:  # gradients reaching x sum the same bf16 terms in another order
        assert_close(fn[name], plain[name], tol=1e-2, msg=name)


def saved_storages(output):
    """data_ptr -> (bytes, {names of the graph nodes saving it}), parameters left out."""
    found, seen, stack = {}, set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        tensors = [t for t in getattr(node, "saved_tensors", ()) if t is not None]
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                tensors += [value] if isinstance(value, torch.Tensor) else []
        for t in tensors:
            if isinstance(t, nn.Parameter) or t.is_leaf and t.requires_grad:
                continue
            storage = t.untyped_storage()
            entry = found.setdefault(storage.data_ptr(), [storage.nbytes(), set(), t])
            entry[1].add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return found


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_adapters_keep_no_activation_of_their_own(dropout):
    """All-linear on Llama: what only the LoRA nodes keep is h = x A^T (N, r) and int32 drop positions."""
    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout)).train()
    embeds = torch.randn(2, 9, 32, requires_grad=True)
    kept_anyway = {p.untyped_storage().data_ptr() for p in [*model.parameters(), embeds]}  # weights, the input
    own = [t for ptr, (_, nodes, t) in saved_storages(model(inputs_embeds=embeds).logits).items()
           if nodes == {"LoraLinearFunctionBackward"} and ptr not in kept_anyway]
    assert own
    for t in own:
        assert (t.shape == (18, 4) and t.is_floating_point()) or (t.dim() == 1 and t.dtype == torch.int32), t.shape
    with autograd.lora_path("plain"):  # the reference keeps (copies of) the layers' inputs
        plain = saved_storages(model(inputs_embeds=embeds).logits)
    assert any(t.shape[-1] in (32, 64) and t.dim() >= 2 for _, nodes, t in plain.values() if nodes <= {"MmBackward0"})


def test_recipes_rebuild_norm_and_mlp_inputs():
    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules="all-linear"))
    found = {}
    original = autograd.find_recipe

    def spy(x):
        found[tuple(x.shape)] = recipe = original(x)
        return recipe

    embeds = torch.randn(2, 9, 32, requires_grad=True)
    try:
        autograd.find_recipe = spy
        model(inputs_embeds=embeds)
    finally:
        autograd.find_recipe = original
    norm, mlp = found[(2, 9, 32)], found[(2, 9, 64)]  # (the attention output is saved: it is SDPA's own)
    assert norm is not None and norm.scaled is not None  # x = h * rsqrt(...) * weight
    assert mlp is not None and mlp.scaled is None and mlp.program[0] == "mul"  # x = act(gate) * up
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        x = model.base_model.model.model.norm(embeds)
        assert autograd.find_recipe(x) is None  # graph saved through hooks: x itself is saved instead
    assert autograd.find_recipe(x) is not None


def test_in_place_change_of_what_a_recipe_reads_is_an_error():
    norm = nn.RMSNorm(8)
    lora = wrapped(nn.Linear(8, 4))
    h = torch.randn(3, 8, requires_grad=True)
    hidden = h * 1.0
    out = lora(norm(hidden))
    with torch.no_grad():
        hidden.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_inference_path_equals_plain_forward():
    torch.manual_seed(0)
    lora = wrapped(nn.Linear(16, 12), dropout=0.3)
    x = torch.randn(5, 16)
    for mode in (lora.eval, lora.train):
        mode()
        outs = []
        for path in ("plain", "function"):
            torch.manual_seed(1)
            with torch.no_grad(), autograd.lora_path(path):
                outs.append(lora(x))
        assert_close(outs[1], outs[0], msg="output")


def test_autocast_takes_the_plain_path():
    torch.manual_seed(0)
    lora = wrapped(nn.Linear(16, 12), dropout=0.1)
    x = torch.randn(4, 16, requires_grad=True)
    outs = []
    for path in ("plain", "function"):
        torch.manual_seed(1)
        with autograd.lora_path(path), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(lora(x))
    outs[1].float().sum().backward()
    assert torch.equal(outs[0], outs[1]) and x.grad is not None


def test_gpt2_conv1d_model_gradients_equal_plain_path():
    def grads(path):
        model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, init_lora_weights=False, lora_dropout=0.1)).train()
        torch.manual_seed(0)
        with autograd.lora_path(path):
            model(torch.arange(8).view(1, 8)).logits.pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, fn = grads("plain"), grads("function")
    for name in plain:
        assert_close(fn[name], plain[name], msg=name)


def test_drop_positions():
    a = autograd.drop_positions(7, 100_000, 0.1)
    assert torch.equal(a, autograd.drop_positions(7, 100_000, 0.1))
    assert not torch.equal(a, autograd.drop_positions(8, 100_000, 0.1))
    assert a.dtype == torch.int64 and int(a.min()) >= 0 and int(a.max()) < 100_000
    assert bool((a[1:] > a[:-1]).all())  # sorted, no repeats
    assert abs(len(a) / 100_000 - 0.1) < 0.006  # 6 sigma
    counts = torch.zeros(1000)
    for seed in range(400):  # every element is dropped with probability p, whatever its place
        positions = autograd.drop_positions(seed, 1000, 0.25)
        counts.index_add_(0, positions, torch.ones(len(positions)))
    assert abs(counts.mean().item() / 400 - 0.25) < 0.01 and counts.min() > 50 and counts.max() < 150
    assert len(autograd.drop_positions(0, 10, 0.999)) >= 8  # gaps reaching past the end


def test_seeded_dropout_scales_kept_elements():
    x = torch.randn(50, 40)
    y = autograd.seeded_dropout(x, 0.5, 3)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * 2)
    assert autograd.seeded_dropout(x, 0.0, 3) is x


def test_path_switch(monkeypatch):
    assert autograd.get_lora_path() == "function"
    with autograd.lora_path("plain"):
        assert autograd.get_lora_path() == "plain"
    assert autograd.get_lora_path() == "function"
    with pytest.raises(ValueError, match="unknown LoRA path 'fast'"):
        autograd.set_lora_path("fast")
    monkeypatch.setenv(autograd.PATH_ENV, "plain")
    assert autograd._path_from_env() == "plain"
    monkeypatch.setenv(autograd.PATH_ENV, "fused")
    with pytest.raises(ValueError, match="LORAKIT_LORA_PATH='fused'"):
        autograd._path_from_env()


def test_lora_linear_arguments():
    a, b, x = torch.randn(2, 4), torch.randn(3, 2), torch.randn(5, 4)
    with pytest.raises(ValueError, match="exactly one of result"):
        autograd.lora_linear(None, x, a, b, None, 1.0)
    with pytest.raises(ValueError, match="frozen weight"):
        autograd.lora_linear(None, x, a, b, None, 1.0, weight=torch.randn(3, 4, requires_grad=True))
