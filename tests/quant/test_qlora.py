"""QLoRA: LoRA on the 4-bit base, training through it, merging out of it, files of it."""

import copy
import json

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, PeftModel, TargetError, get_peft_model
from lorakit.cli import main as cli_main
from lorakit.layers import LoraLayer
from lorakit.quant import (
    Linear4bit,
    Linear4bitLora,
    QuantizedMergeError,
    load_quantized,
    quantize_model,
    save_quantized,
)

from conftest import checkpointing_on, logits, tiny_llama

QV = dict(target_modules=["q_proj", "v_proj"])


def qlora(seed=0, double_quant=False, llama=None, **config):
    """A tiny Llama with an NF4 base and a random (non-zero) adapter on every linear layer."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False} | config
    return get_peft_model(tiny_llama(seed, **(llama or {})), LoraConfig(**config), quantize="nf4",
                          double_quant=double_quant)


def dequantized_float_model(peft_model, seed=0):
    """The same model in float: a plain tiny Llama whose linear weights are the dequantized NF4 ones."""
    base = tiny_llama(seed)
    for path, module in peft_model.base_model.model.named_modules():
        if isinstance(module, Linear4bit):
            target = base.get_submodule(path.removesuffix(".base_layer"))
            target.weight.data.copy_(module.dequantize(torch.float32))
    return base


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0")


# --- wrapping -----------------------------------------------------------------------------------

def test_quantize_replaces_every_linear_but_the_head():
    model = qlora(target_modules=["q_proj", "v_proj"])
    inner = model.base_model.model
    assert isinstance(inner.lm_head, nn.Linear)
    attn = inner.model.layers[0].self_attn
    assert isinstance(attn.q_proj, Linear4bitLora) and isinstance(attn.q_proj.base_layer, Linear4bit)
    assert isinstance(attn.k_proj, Linear4bit)  # quantized, not adapted
    assert not any(type(m) is nn.Linear for p, m in inner.named_modules() if p != "lm_head" and "lora_" not in p)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_bad_targets_or_method_raise_before_quantizing():
    model = tiny_llama()
    with pytest.raises(TargetError):
        get_peft_model(model, LoraConfig(target_modules=["nope"]), quantize="nf4")
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(model, LoraConfig(**QV), quantize="int3")
    assert not any(isinstance(m, Linear4bit) for m in model.modules())


def test_modules_to_save_stay_float():
    model = get_peft_model(tiny_llama(), LoraConfig(**QV, modules_to_save=["down_proj"]), quantize="nf4")
    saved = model.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(saved.original_module, nn.Linear)


def test_forward_is_the_4bit_base_plus_the_lora_path(ids):
    model = qlora()
    reference = get_peft_model(dequantized_float_model(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    factors = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert not reference.load_state_dict(factors, strict=False).unexpected_keys  # the same factors
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        base_out = logits(model, ids)
    with reference.disable_adapter():
        torch.testing.assert_close(base_out, logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_mixed_batch_routes_rows_on_a_4bit_base(ids):
    model = qlora()
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        mixed = model(ids, adapter_names=["default", "__base__"]).logits
        first = model(ids[:1]).logits
        with model.disable_adapter():
            second = model(ids[1:]).logits
    torch.testing.assert_close(mixed, torch.cat([first, second]), rtol=1e-5, atol=1e-5)


def test_pissa_init_is_refused_on_a_4bit_base():
    with pytest.raises(ValueError, match="pissa"):
        qlora(init_lora_weights="pissa")


# --- counting -----------------------------------------------------------------------------------

def test_parameter_count_uses_the_logical_size_of_4bit_weights(capsys):
    float_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"), quantize="nf4")
    assert model.get_nb_trainable_parameters() == float_model.get_nb_trainable_parameters() == (4096, 29088)
    layer = model.base_model.model.model.layers[0].mlp.up_proj.base_layer
    assert layer.quantized_numel == 32 * 64 and layer.weight.numel() == 32 * 64 // 2
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == "trainable params: 4,096 || all params: 29,088 || trainable%: 14.0814"


# bitsandbytes 0.50's CPU dequantize is wrong when in_features < blocksize (e.g. 32 < 64: its
# output is off by up to the weights' scale while the packed bytes equal ours), so the oracle
# model's layers are at least 64 wide.
BNB_SAFE_LLAMA = dict(hidden_size=64, intermediate_size=128)


def _bnb_quantized_llama(double_quant):
    """A tiny Llama with bitsandbytes NF4 layers in place of every Linear but the head (CPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama(**BNB_SAFE_LLAMA)
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path != "lm_head":
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      quant_type="nf4", compute_dtype=torch.float32)
            layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=double_quant)
            layer.support_avx512bf16_for_cpu = False  # its packed CPU kernel rejects these tiny shapes
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer.to("cpu"))
    return model


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("double_quant", [False, True])
def test_counts_and_outputs_match_peft_on_bitsandbytes(tmp_path, ids, double_quant):
    peft = pytest.importorskip("peft")
    model = qlora(double_quant=double_quant, llama=BNB_SAFE_LLAMA)
    model.save_pretrained(tmp_path)
    oracle = peft.PeftModel.from_pretrained(_bnb_quantized_llama(double_quant), tmp_path)
    assert oracle.get_nb_trainable_parameters()[1] == model.get_nb_trainable_parameters()[1]
    torch.testing.assert_close(logits(model, ids), logits(oracle, ids), rtol=1e-4, atol=1e-4)


# --- merging ------------------------------------------------------------------------------------

def test_merge_into_4bit_is_refused_and_changes_nothing(ids):
    model = qlora(target_modules=["q_proj", "v_proj", "lm_head"])  # lm_head: a float layer, listed last
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizedMergeError, match="merge_and_unload"):
        model.merge_adapter()
    assert not model.merged
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.unmerge_adapter()  # nothing to undo
    with model.disable_adapter():
        pass
    assert not model.merged


def test_merge_and_unload_dequantizes_to_bf16_and_matches_within_bf16(ids):
    model = qlora(target_modules=["q_proj", "v_proj", "lm_head"], lora_bias=False)
    expected = logits(model, ids)
    plain = model.merge_and_unload()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, (Linear4bit, LoraLayer)) for m in plain.modules())
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    got = logits(plain, ids).float()
    torch.testing.assert_close(got, expected, rtol=0, atol=0.03 * expected.abs().max().item())
    assert (got - expected).abs().mean() < 0.005 * expected.abs().max()


def test_merge_and_unload_in_the_original_dtype_is_exact(ids):
    model = qlora(double_quant=True)
    expected = logits(model, ids)
    plain = model.merge_and_unload(dtype="original")
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_safe_merge_refuses_nan(ids):
    model = qlora()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_and_unload(safe_merge=True)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, Linear4bitLora)


# --- training -----------------------------------------------------------------------------------

def _train(model, ids, steps=8, lr=2e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_training_with_gradient_checkpointing_lowers_the_loss(ids, use_reentrant):
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                           quantize="nf4")
    checkpointing_on(model, use_reentrant=use_reentrant)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    losses = _train(model, ids)
    assert losses[-1] < losses[0] - 0.3  # 4.61 -> about 4.15 in 8 steps
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if k in frozen)


def test_input_gradients_reach_the_first_layer_with_reentrant_checkpointing(ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"),
                           quantize="nf4")
    checkpointing_on(model, use_reentrant=True)
    model.train()
    model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.data.normal_()
    model(input_ids=ids, labels=ids).loss.backward()
    grad = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_the_lora_function_path_and_the_plain_path_agree_on_a_4bit_base(ids):
    autograd = pytest.importorskip("lorakit.layers.autograd")
    grads = {}
    for path in ("function", "plain"):
        model = qlora(lora_dropout=0.1)
        model.train()
        torch.manual_seed(3)
        with autograd.lora_path(path):
            model(input_ids=ids, labels=ids).loss.backward()
        grads[path] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads["plain"].items():
        torch.testing.assert_close(grads["function"][name], grad, rtol=1e-4, atol=1e-6)


# --- adapters and files -------------------------------------------------------------------------

def test_adapter_trained_on_4bit_loads_on_the_float_base_and_in_peft(tmp_path, ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, **QV), quantize="nf4")
    _train(model, ids, steps=2)
    model.save_pretrained(tmp_path / "q")
    get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, **QV)).save_pretrained(tmp_path / "f")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "q" / "adapter_model.safetensors"))
    assert saved.keys() == load_file(str(tmp_path / "f" / "adapter_model.safetensors")).keys()
    assert json.loads((tmp_path / "q" / "adapter_config.json").read_text())["r"] == 4

    on_float = PeftModel.from_pretrained(tiny_llama(), tmp_path / "q")
    peft = pytest.importorskip("peft")
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "q")
    torch.testing.assert_close(logits(on_float, ids), logits(in_peft, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(on_float, ids), logits(tiny_llama(), ids))  # the adapter does something


@pytest.mark.parametrize("double_quant", [False, True])
def test_save_and_load_quantized_without_quantizing_again(tmp_path, ids, monkeypatch, double_quant):
    model = get_peft_model(tiny_llama(tie_word_embeddings=True), LoraConfig(r=4, lora_alpha=8, **QV,
                           init_lora_weights=False), quantize="nf4", double_quant=double_quant)
    expected = logits(model, ids)
    save_quantized(model, tmp_path / "base", tokenizer=tiny_tokenizer())
    model.save_pretrained(tmp_path / "adapter")
    assert {"model.safetensors", "quantization.json", "config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "base").iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    def no_quantizing(*args, **kwargs):
        raise AssertionError("quantize_nf4 called while loading")

    monkeypatch.setattr("lorakit.quant.linear4bit.quantize_nf4", no_quantizing)
    base = load_quantized(tmp_path / "base")
    assert base.lm_head.weight is base.model.embed_tokens.weight
    q = base.model.layers[1].mlp.up_proj
    original = model.base_model.model.model.layers[1].mlp.up_proj
    assert isinstance(q, Linear4bit) and q.double_quant == double_quant
    assert torch.equal(q.weight, original.weight) and torch.equal(q.weight_absmax, original.weight_absmax)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=0)


def test_load_quantized_fills_a_given_model(tmp_path, ids):
    model = quantize_model(tiny_llama())
    expected = logits(model, ids)
    save_quantized(model, tmp_path / "base")
    with torch.device("meta"):
        skeleton = copy.deepcopy(tiny_llama(seed=5)).to("meta")
    skeleton.model.rotary_emb = tiny_llama().model.rotary_emb  # a real non-persistent buffer
    torch.testing.assert_close(logits(load_quantized(tmp_path / "base", model=skeleton), ids), expected,
                               rtol=0, atol=0)


def test_save_quantized_refuses_what_it_cannot_save(tmp_path):
    with pytest.raises(ValueError, match="no 4-bit layer"):
        save_quantized(tiny_llama(), tmp_path / "x")
    model = quantize_model(tiny_llama())
    save_quantized(model, tmp_path / "base")
    with pytest.raises(ValueError, match="not empty"):
        save_quantized(model, tmp_path / "base")
    save_quantized(model, tmp_path / "base", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    with pytest.raises(ValueError, match="quantization.json"):
        load_quantized(tmp_path)


# --- lorakit merge ------------------------------------------------------------------------------

def test_merge_command_writes_a_plain_hf_folder(tmp_path, ids):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=8, **QV,
                           init_lora_weights=False))
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")

    assert cli_main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("w3 w5").input_ids == [3, 5]
    assert cli_main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 2  # exists
    assert cli_main(["merge", str(tmp_path / "adapter"), str(tmp_path / "adapter")]) == 2  # its own input
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged"]


def test_merge_command_onto_the_nf4_base_reproduces_the_qlora_model(tmp_path, ids):
    from transformers import AutoModelForCausalLM

    from lorakit.export import merge

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, **QV, init_lora_weights=False), quantize="nf4")
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    merge(str(tmp_path / "adapter"), str(tmp_path / "merged"), dtype="fp32", quantize="nf4")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)


def test_staged_directory_keeps_the_old_folder_when_writing_fails(tmp_path):
    from lorakit.files import staged_directory

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(RuntimeError), staged_directory(out, overwrite=True) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("disk full")
    assert (out / "a").read_text() == "old"
    with staged_directory(out, overwrite=True) as tmp:
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
