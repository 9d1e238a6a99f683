"""DoRA against PEFT 0.21.2 (the oracle): the same trainable parameters, the same initial magnitude,
the same files (magnitude under `<module>.lora_magnitude_vector`, shape (out,)), adapters saved by
one library loading in the other with the same outputs, and the same loss and gradients in a
training step; within 1e-5 in fp32, on a small Llama and on GPT-2 (Conv1D).
"""

import warnings

import pytest
import torch
from safetensors.torch import load_file

import lorakit

peft = pytest.importorskip("peft")

from conftest import assert_round_trip, eval_logits, perturb_trainables, tiny_gpt2, tiny_llama  # noqa: E402

TOL = 1e-5

MODELS = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "o_proj", "down_proj"]),
    "llama-bias": (lambda: tiny_llama(attention_bias=True, mlp_bias=True), ["q_proj", "k_proj", "up_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
}


def build(lib, arch, **overrides):
    make, targets = MODELS[arch]
    config = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True) | overrides
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: fan_in_fan_out for Conv1D
        return lib.get_peft_model(make(), lib.LoraConfig(**config))


def trainable(model):
    return sorted((n, p.numel()) for n, p in model.named_parameters() if p.requires_grad)


@pytest.fixture
def ids():
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_same_trainable_parameters_and_initial_magnitude(arch):
    ours, theirs = build(lorakit, arch), build(peft, arch)
    assert trainable(ours) == trainable(theirs)
    assert any(".lora_magnitude_vector.default.weight" in n for n, _ in trainable(ours))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    magnitudes = lambda m: {n: p for n, p in m.named_parameters() if "magnitude" in n}  # noqa: E731
    for name, value in magnitudes(theirs).items():
        assert (magnitudes(ours)[name] - value).abs().max() <= TOL, name  # ||W||_row (B = 0)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_round_trip_both_ways(arch, tmp_path, ids):
    ours, theirs = build(lorakit, arch), build(peft, arch)
    make = MODELS[arch][0]

    assert_round_trip(ours, theirs, make, ids, tmp_path, tol=TOL)

    # the same file: keys (the magnitude without ".weight"), shapes, and the config flag
    ours_file = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs_file = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert {k: tuple(t.shape) for k, t in ours_file.items()} == {k: tuple(t.shape) for k, t in theirs_file.items()}
    magnitude_keys = [k for k in ours_file if "magnitude" in k]
    assert magnitude_keys and all(k.endswith(".lora_magnitude_vector") for k in magnitude_keys)
    assert lorakit.adapter_format.read_config(tmp_path / "theirs").use_dora


@pytest.mark.parametrize("arch", ["llama-bias", "gpt2"])
def test_training_step_matches_peft(arch, ids):
    """Same loss and gradients (magnitude, A, B and a trained base bias) on both of lorakit's paths."""
    ours = build(lorakit, arch, bias="lora_only", init_lora_weights=False)
    theirs = build(peft, arch, bias="lora_only", init_lora_weights=False)
    perturb_trainables(ours)
    state = {k.replace(".default", ""): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict({k: state[k.replace(".default", "")] for k in theirs.state_dict()})
    for model in (ours, theirs):
        model.train()
        for module in model.modules():  # GPT-2's own dropout off: only the adapters differ
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    loss = theirs(ids, labels=ids).loss
    loss.backward()
    expected = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for path in lorakit.layers.autograd.PATHS:
        ours.zero_grad()
        with lorakit.layers.autograd.lora_path(path):
            ours_loss = ours(ids, labels=ids).loss
        ours_loss.backward()
        assert abs(ours_loss.item() - loss.item()) <= TOL
        grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            assert (grad - expected[name]).abs().max() <= TOL, (path, name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_model_equals_pefts_merged_model(arch, ids):
    ours, theirs = build(lorakit, arch, init_lora_weights=False), build(peft, arch, init_lora_weights=False)
    perturb_trainables(ours)
    state = {k.replace(".default", ""): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict({k: state[k.replace(".default", "")] for k in theirs.state_dict()})
    expected = eval_logits(theirs.merge_and_unload(), ids)
    assert (eval_logits(ours.merge_and_unload(), ids) - expected).abs().max() <= TOL
