"""Parity of lorakit.quant.nf4 with bitsandbytes' NF4 on CPU, byte for byte.

bitsandbytes is only an oracle here: the module is skipped when it is not
installed.
"""

import pytest
import torch

from lorakit.quant import NF4_CODE, dynamic_map, quantize_nf4
from lorakit.quant.nf4 import _quantize_dynamic_8bit

bnb_functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 128), (33, 64), (7, 9), (5,), (1, 64), (300, 197), (17, 4096), (3, 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    # bitsandbytes wraps its generic 4-bit dequantize (used for odd last
    # dimensions) in torch.compile; compiling it for every shape and dtype
    # takes seconds on a small CPU and yields the same float32 multiply.
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_quantize(w: torch.Tensor, blocksize: int, double_quant: bool):
    return bnb_functional.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
    )


def assert_same(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> None:
    packed, state = bnb_quantize(w, blocksize, double_quant)
    qt = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert torch.equal(qt.packed, packed.view(-1))
    assert torch.equal(qt.absmax, state.absmax)
    if double_quant:
        assert torch.equal(qt.absmax_scale, state.state2.absmax)
        assert torch.equal(qt.absmax_offset, state.offset)
    expected = bnb_functional.dequantize_4bit(packed, state)
    got = qt.dequantize()
    assert got.dtype == expected.dtype
    # bitsandbytes returns a 1-D tensor of even length as (1, n).
    assert torch.equal(got, expected.reshape(w.shape))


def test_code_books_are_the_same():
    assert torch.equal(torch.tensor(NF4_CODE), bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_quantize_and_dequantize_match(shape, dtype, double_quant):
    gen = torch.Generator().manual_seed(SHAPES.index(shape) * len(DTYPES) + DTYPES.index(dtype))
    w = (torch.randn(*shape, generator=gen) * 0.02).to(dtype)
    assert_same(w, double_quant=double_quant)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_other_blocksizes_match(blocksize, double_quant):
    w = torch.randn(129, 257, generator=torch.Generator().manual_seed(blocksize))
    assert_same(w.to(torch.bfloat16), blocksize, double_quant)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_midpoints_and_extremes_match(dtype):
    # Values on (and one float32 step around) every midpoint between codes,
    # with absmax 1 so that they are not rescaled: bitsandbytes' tie-breaking.
    code = torch.tensor(NF4_CODE)
    mid = (code[:-1] + code[1:]) / 2
    near = torch.cat([mid, mid.nextafter(torch.tensor(2.0)), mid.nextafter(torch.tensor(-2.0)), code])
    block = torch.cat([torch.tensor([1.0]), near, torch.zeros(64 - 1 - near.numel())])
    w = torch.stack([block, -block, block * 3.5, torch.zeros(64), torch.full((64,), -7.0)])
    assert_same(w.to(dtype))
    assert_same(w.to(dtype), double_quant=True)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_zero_blocks_and_zero_tail_match(double_quant):
    w = torch.zeros(3 * 64 + 5)
    w[64:128] = torch.linspace(-1, 1, 64)
    assert_same(w, double_quant=double_quant)
    assert_same(torch.zeros(64), double_quant=double_quant)  # one block: centred scales all 0


@pytest.mark.parametrize("n", [1, 255, 256, 1000])
def test_8bit_scale_quantization_matches_near_boundaries(n):
    # bitsandbytes' CPU kernel rounds onto a 65536-point grid before taking
    # the nearest code. Half the inputs sit one float32 step off the grid's
    # rounding edges, half within a grid step of a midpoint between codes
    # (where about a quarter of them do not get the exactly nearest code).
    gen = torch.Generator().manual_seed(n)
    grid_edges = (2 * (torch.randint(0, 65536, (n,), generator=gen).double() - 0.5) / 65535 - 1).float()
    grid_edges = grid_edges.nextafter(torch.where(torch.rand(n, generator=gen) < 0.5, 2.0, -2.0))
    code = dynamic_map()
    midpoints = (code[:-1] + code[1:]) / 2
    near_midpoints = midpoints[torch.randint(0, 255, (n,), generator=gen)]
    near_midpoints += (torch.rand(n, generator=gen) - 0.5) * 3e-5
    values = torch.where(torch.arange(n) % 2 == 0, grid_edges, near_midpoints).clamp(-1, 1)
    values[::256] = 1.0  # each block's absmax is 1: the values are not rescaled
    expected_codes, expected_state = bnb_functional.quantize_blockwise(values, blocksize=256)
    codes, absmax = _quantize_dynamic_8bit(values)
    assert torch.equal(codes, expected_codes)
    assert torch.equal(absmax, expected_state.absmax)
