"""Unit tests of lorakit.quant: the NF4 format, Linear4bit and quantize_model."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.quant import (
    NF4_CODE,
    Linear4bit,
    NF4Tensor,
    nf4_bits_per_param,
    nf4_code,
    quantize_model,
    quantize_nf4,
)

def normal_float_code(offset: float = 0.9677083) -> torch.Tensor:
    """NF4 from its definition (Dettmers et al., QLoRA, as bitsandbytes' create_normal_map builds it):
    8 positive and 7 negative quantiles of N(0, 1) between `offset` and 1/2, and an exact zero,
    scaled to [-1, 1]."""
    def quantiles(n):
        return torch.special.ndtri(torch.linspace(offset, 0.5, n, dtype=torch.float64)[:-1])

    values = torch.cat([quantiles(9), torch.zeros(1, dtype=torch.float64), -quantiles(8)]).sort().values
    return values / values.abs().max()

# FP4 (e2m1, bitsandbytes' table up to code order), normalised to [-1, 1].
FP4_VALUES = torch.tensor([0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]) / 12.0
FP4_VALUES = torch.cat([-FP4_VALUES.flip(0), FP4_VALUES])


def fp4_roundtrip(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Reference blockwise absmax FP4 quantize + dequantize (numel % blocksize == 0)."""
    blocks = w.reshape(-1, blocksize).float()  # (n_blocks, bs)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1)
    nearest = ((blocks / absmax)[..., None] - FP4_VALUES).abs().argmin(dim=-1)  # (n_blocks, bs)
    return (FP4_VALUES[nearest] * absmax).view(w.shape)


def rel_rmse(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact.float()).pow(2).mean() / exact.float().pow(2).mean()).sqrt().item()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)


# --------------------------------------------------------------------------- #
# Format
# --------------------------------------------------------------------------- #


def test_the_16_codes_are_the_normal_float_quantiles():
    expected = normal_float_code()
    assert torch.allclose(torch.tensor(NF4_CODE, dtype=torch.float64), expected, rtol=0, atol=2e-7)
    code = nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.equal(code, torch.tensor(NF4_CODE, dtype=torch.float32))
    assert torch.all(code[1:] > code[:-1]) and code[7] == 0 and code[0] == -1 and code[-1] == 1


def test_bits_per_param():
    assert nf4_bits_per_param() == 4.5
    assert nf4_bits_per_param(64, double_quant=True) == pytest.approx(4.127, abs=5e-4)
    assert nf4_bits_per_param(128) == 4.25
    w = torch.randn(512, 512)
    assert quantize_nf4(w).bits_per_param == 4.5
    assert quantize_nf4(w, double_quant=True).bits_per_param == pytest.approx(4.127, abs=1e-3)
    with pytest.raises(ValueError):
        nf4_bits_per_param(0)


def test_packing_order_first_element_in_high_nibble():
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    perm = torch.cat([perm, torch.tensor([0, 15])])  # absmax stays exactly 1
    w = torch.tensor(NF4_CODE)[perm] * 1.0
    qt = quantize_nf4(w, blocksize=len(perm))
    assert torch.equal(qt.packed, ((perm[0::2] << 4) | perm[1::2]).to(torch.uint8))
    assert torch.equal(qt.dequantize(), w)


def test_gaussian_roundtrip_beats_fp4():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    nf4_err = rel_rmse(quantize_nf4(w).dequantize(), w)
    fp4_err = rel_rmse(fp4_roundtrip(w), w)
    nf4_dq_err = rel_rmse(quantize_nf4(w, double_quant=True).dequantize(), w)
    assert nf4_err < 0.1  # measured 0.092
    assert nf4_err < 0.9 * fp4_err  # measured FP4 0.122
    assert nf4_dq_err < nf4_err * 1.01


def test_requantizing_the_dequantized_tensor_is_stable():
    w = torch.randn(64, 192, generator=torch.Generator().manual_seed(1))
    qt = quantize_nf4(w)
    again = quantize_nf4(qt.dequantize())
    assert torch.equal(again.packed, qt.packed)
    assert torch.equal(again.absmax, qt.absmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_inputs_dequantize_to_their_dtype(dtype):
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    qt = quantize_nf4(w)
    assert qt.absmax.dtype == torch.float32
    out = qt.dequantize()
    assert out.dtype == dtype and out.shape == w.shape
    assert rel_rmse(out, w) < 0.11
    assert torch.equal(qt.dequantize(torch.float32).to(dtype), out)


@pytest.mark.parametrize(
    ("shape", "blocksize"),
    [((7, 9), 64), ((5,), 64), ((3, 65), 64), ((1, 1), 64), ((10, 33), 32), ((3, 100), 128), ((2, 3, 11), 16)],
)
@pytest.mark.parametrize("double_quant", [False, True])
def test_odd_sizes(shape, blocksize, double_quant):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    n = w.numel()
    qt = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert qt.packed.shape == ((n + 1) // 2,) and qt.packed.dtype == torch.uint8
    assert qt.absmax.shape == (-(-n // blocksize),)
    if n % 2:
        assert qt.packed[-1] & 0xF == 7  # the zero pad element
    out = qt.dequantize()
    assert out.shape == w.shape
    assert rel_rmse(out, w) < 0.15
    # The largest element of each block maps to code +-1, i.e. back to +-scale.
    n_blocks = qt.absmax.numel()
    padded = torch.nn.functional.pad(out.reshape(-1), (0, n_blocks * blocksize - n))
    assert torch.equal(padded.view(n_blocks, blocksize).abs().amax(dim=1), qt.scales())


def test_short_tail_block_has_its_own_scale():
    w = torch.cat([torch.full((64,), 0.01), torch.tensor([5.0, -2.5, 0.0])])
    qt = quantize_nf4(w)
    assert torch.equal(qt.absmax, torch.tensor([0.01, 5.0]))
    out = qt.dequantize()
    assert torch.allclose(out[:64], w[:64])
    assert out[64] == 5.0 and out[66] == 0.0


@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_tensor(double_quant):
    w = torch.zeros(4, 64)
    qt = quantize_nf4(w, double_quant=double_quant)
    assert torch.all(unpack(qt.packed) == 7)
    assert torch.equal(qt.dequantize(), w)


def test_double_quant_single_block_keeps_the_scale():
    w = torch.randn(1, 64, generator=torch.Generator().manual_seed(4))
    qt = quantize_nf4(w, double_quant=True)
    assert torch.equal(qt.scales(), quantize_nf4(w).absmax)


def test_double_quant_scales_are_close():
    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(5))
    plain, dq = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    assert dq.absmax.dtype == torch.uint8 and dq.absmax_scale.shape == (5,) and dq.absmax_offset.shape == ()
    assert torch.equal(dq.packed, plain.packed)
    assert rel_rmse(dq.scales(), plain.absmax) < 5e-3


@pytest.mark.parametrize(("shape", "blocksize"), [((37, 100), 64), ((16, 64), 64), ((9, 7), 32)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_rows_matches_full(shape, blocksize, double_quant):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    qt = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    full = qt.dequantize()
    for start, stop in [(0, shape[0]), (1, 2), (3, 8), (shape[0] - 1, shape[0]), (5, 5)]:
        assert torch.equal(qt.dequantize_rows(start, stop), full[start:stop])
    assert qt.dequantize_rows(1, 4, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        qt.dequantize_rows(2, 1)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dict_roundtrip_through_safetensors(tmp_path, double_quant):
    w = torch.randn(33, 70, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    qt = quantize_nf4(w, blocksize=32, double_quant=double_quant)
    path = tmp_path / "w.safetensors"
    save_file(qt.to_dict(), str(path))
    back = NF4Tensor.from_dict(load_file(str(path)))
    assert back.shape == w.shape and back.dtype == torch.bfloat16 and back.blocksize == 32
    assert back.double_quant == double_quant
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_from_dict_rejects_inconsistent_sizes():
    d = quantize_nf4(torch.randn(8, 64)).to_dict()
    d["absmax"] = d["absmax"][:-1]
    with pytest.raises(ValueError):
        NF4Tensor.from_dict(d)
    with pytest.raises(KeyError):
        NF4Tensor.from_dict({"packed": d["packed"]})


def test_quantize_errors():
    with pytest.raises(ValueError):
        quantize_nf4(torch.empty(0, 4))
    with pytest.raises(TypeError):
        quantize_nf4(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError):
        quantize_nf4(torch.ones(4), blocksize=0)


# --------------------------------------------------------------------------- #
# Linear4bit
# --------------------------------------------------------------------------- #


def reference_linear(layer: Linear4bit) -> nn.Linear:
    ref = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    ref.weight.data = layer.dequantize(torch.float32)
    if layer.bias is not None:
        ref.bias.data = layer.bias.detach().float().clone()
    return ref


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("chunk_numel", [None, 250])  # one chunk; chunks of 2 rows
def test_linear4bit_forward_and_input_grad(bias, double_quant, chunk_numel):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(100, 37, bias=bias), double_quant=double_quant)
    if chunk_numel:
        layer.dequant_chunk_numel = chunk_numel
    ref = reference_linear(layer)
    x = torch.randn(3, 5, 100, requires_grad=True)
    y, y_ref = layer(x), ref(x)
    assert y.shape == (3, 5, 37)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_linear4bit_is_frozen_and_saves_no_float_weight():
    layer = Linear4bit.from_linear(nn.Linear(64, 48))
    assert [p for p in layer.parameters() if p.requires_grad] == []
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (64 * 48 // 2,)
    saved = []
    x = torch.randn(2, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert all(t.numel() < 64 * 48 for t in saved)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_linear4bit_compute_dtype_and_casts():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 32), double_quant=True, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, reference_linear(layer)(x), rtol=3e-2, atol=3e-2)
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.uint8 and layer.weight_absmax.dtype == torch.uint8
    assert layer.weight_absmax_scale.dtype == torch.float32 and layer.weight_absmax_offset.dtype == torch.float32
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_linear4bit_from_bf16_linear():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    layer = Linear4bit.from_linear(linear)
    assert layer.orig_dtype == torch.bfloat16 and layer.dequantize().dtype == torch.bfloat16
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_state_dict_roundtrip(double_quant):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(70, 30), blocksize=32, double_quant=double_quant)
    fresh = Linear4bit(70, 30, blocksize=32, double_quant=double_quant)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 70)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.dequantize(), layer.dequantize())
    with pytest.raises(RuntimeError):
        Linear4bit(70, 30, blocksize=64, double_quant=double_quant).load_state_dict(layer.state_dict())
    with pytest.raises(RuntimeError):
        Linear4bit(70, 30, blocksize=32, double_quant=not double_quant).load_state_dict(layer.state_dict())


# --------------------------------------------------------------------------- #
# quantize_model on a tiny Llama
# --------------------------------------------------------------------------- #


def tiny_llama(dtype: torch.dtype):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def enable_checkpointing(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_model_tiny_llama_trains_with_checkpointing(dtype):
    model = tiny_llama(dtype)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits.float()

    assert quantize_model(model, double_quant=True) is model
    quantized = {name for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(quantized) == 2 * 7
    assert type(model.lm_head) is nn.Linear
    assert not any(isinstance(m, nn.Linear) for name, m in model.named_modules() if name != "lm_head")
    with torch.no_grad():
        assert rel_rmse(model(ids).logits, logits) < 0.2  # measured 0.07 (fp32), 0.10 (bf16)

    enable_checkpointing(model)
    model.train()
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 2  # forward, then the checkpoint's recomputation
    # Layer 0's norm only gets a gradient through the 4-bit projections' input grads.
    grad = model.model.layers[0].input_layernorm.weight.grad
    assert grad is not None and torch.isfinite(grad.float()).all() and grad.abs().sum() > 0


def test_quantize_model_skip_by_full_path_or_last_name():
    model = tiny_llama(torch.float32)
    quantize_model(model, skip=("lm_head", "model.layers.0.mlp.down_proj", "v_proj"))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.down_proj, Linear4bit)
    assert all(type(layer.self_attn.v_proj) is nn.Linear for layer in model.model.layers)
    assert type(model.lm_head) is nn.Linear
