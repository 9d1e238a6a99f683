"""NF4 (4-bit NormalFloat) block quantization in pure PyTorch.

This module owns the NF4 number format used by QLoRA: the 16 code values,
blockwise quantization of a float tensor into packed 4-bit codes with one
absmax scale per block, the optional "double quantization" of those scales
to 8 bits, dequantization back to float, the :class:`NF4Tensor` container
that carries all of it (and flattens to a dict of tensors for state dicts),
and the storage cost in bits per parameter.

The results are byte-for-byte those of bitsandbytes on CPU
(``bitsandbytes.functional.quantize_4bit(A, blocksize, quant_type="nf4",
compress_statistics=...)``), including its quirks:

* every input dtype is upcast to float32 first; each full block is scaled
  by ``x * (1 / absmax)`` but the short tail block (when ``numel`` is not a
  multiple of ``blocksize``) by ``x / absmax``, and the tail's stored
  absmax is clamped to at least 1e-38 while a full all-zero block stores 0;
* a value exactly on the midpoint between two codes takes the lower code;
* an odd element count is padded with one zero, i.e. the low nibble of the
  last byte holds code 7;
* the 8-bit double quantization of the scales (blocks of 256, the mean
  subtracted first, bitsandbytes' signed dynamic map) does not pick the
  exactly nearest code: like bitsandbytes' CPU kernel it rounds the scaled
  value onto a grid of 65536 points over [-1, 1] and takes the code nearest
  to that grid point, and an all-zero block gets code 0.

Packing: the tensor is flattened row-major, element ``2k`` goes in the high
nibble and element ``2k + 1`` in the low nibble of byte ``k``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "DOUBLE_QUANT_BLOCKSIZE",
    "NF4_CODE",
    "NF4Tensor",
    "dynamic_map",
    "nf4_bits_per_param",
    "nf4_code",
    "quantize_nf4",
]

NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
"""The 16 NF4 values, indexed by 4-bit code (sorted ascending)."""

DOUBLE_QUANT_BLOCKSIZE = 256
"""Block size of the 8-bit quantization of the absmax scales (as bitsandbytes)."""

_LUT_SIZE = 65536  # grid points of bitsandbytes' CPU 8-bit quantizer over [-1, 1]

# Serialisable dtypes and their codes in NF4Tensor.to_dict()["dtype"].
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


# --------------------------------------------------------------------------- #
# Code books
# --------------------------------------------------------------------------- #


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """Returns the NF4 code values as a tensor.

    Args:
        device: Device of the result. Defaults to CPU.

    Returns:
        float32 tensor of shape ``(16,)``; entry ``i`` is the value of code ``i``.
    """
    return _nf4_code(torch.device(device or "cpu")).clone()


@functools.cache
def _nf4_code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.cache
def _nf4_pair_table(device: torch.device) -> torch.Tensor:
    """Byte -> (value of high nibble, value of low nibble), shape ``(256, 2)``."""
    code = _nf4_code(device)
    byte = torch.arange(256, device=device)
    return torch.stack((code[byte >> 4], code[byte & 0xF]), dim=1)  # (256, 2)


@functools.cache
def _nf4_bounds(device: torch.device) -> torch.Tensor:
    """Midpoints between consecutive NF4 codes, shape ``(15,)``, float32."""
    code = _nf4_code(device)
    return (code[:-1] + code[1:]) / 2


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """Returns bitsandbytes' signed 8-bit dynamic quantization map.

    This is ``bitsandbytes.functional.create_dynamic_map()`` (signed, 7
    maximum exponent bits, 8 total bits), the code book of the double
    quantization of NF4 scales.

    Args:
        device: Device of the result. Defaults to CPU.

    Returns:
        float32 tensor of shape ``(256,)``, sorted ascending, from -0.993 to 1.
    """
    return _dynamic_map(torch.device(device or "cpu")).clone()


@functools.cache
def _dynamic_map(device: torch.device) -> torch.Tensor:
    # Same arithmetic as bitsandbytes (float32 linspace and means, Python
    # scaling), so that every value is bit-identical.
    max_exponent_bits = 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


@functools.cache
def _dynamic_map_lut(device: torch.device) -> torch.Tensor:
    """Grid point -> dynamic-map code, shape ``(65536,)``, uint8.

    Grid point ``i`` is the float32 value ``-1 + 2i / 65535``; its code is
    the first one whose upper midpoint is not below it (bitsandbytes' CPU
    ``build_quantize_lut``).
    """
    code = _dynamic_map(device)
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=device)) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)  # (65536,)


# --------------------------------------------------------------------------- #
# Storage cost
# --------------------------------------------------------------------------- #


def nf4_bits_per_param(blocksize: int = 64, double_quant: bool = False) -> float:
    """Storage cost of NF4 per weight element, in bits, for a large tensor.

    4 bits of code plus the per-block scale: a float32 absmax per block, or
    with double quantization an 8-bit absmax per block plus a float32 scale
    per 256 blocks (the single float32 offset per tensor is neglected).

    Args:
        blocksize: Elements per block. Defaults to 64.
        double_quant: Whether the scales are 8-bit quantized. Defaults to False.

    Returns:
        Bits per parameter: 4.5 for blocksize 64, or 4.127 with double quant.

    Raises:
        ValueError: If ``blocksize`` is not positive.
    """
    _check_blocksize(blocksize)
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * DOUBLE_QUANT_BLOCKSIZE)
    return 4 + 32 / blocksize


def nf4_nbytes(numel: int, double_quant: bool = False, blocksize: int = 64) -> int:
    """Bytes of one weight of `numel` elements stored by `quantize_nf4`: the packed 4-bit codes plus
    the block scales (float32 absmax per block; with double quantization an 8-bit absmax per block,
    a float32 scale per 256 blocks and one float32 offset). Equals `quantize_nf4(w).nbytes`.

    Raises:
        ValueError: If ``blocksize`` is not positive.
    """
    _check_blocksize(blocksize)
    blocks = math.ceil(numel / blocksize)
    if double_quant:
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCKSIZE) + 4
    return math.ceil(numel / 2) + 4 * blocks


def _check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")


# --------------------------------------------------------------------------- #
# The quantized tensor
# --------------------------------------------------------------------------- #


@dataclass
class NF4Tensor:
    """A float tensor quantized to NF4.

    Attributes:
        packed: uint8, shape ``(ceil(numel / 2),)``: two codes per byte, the
            earlier element in the high nibble.
        absmax: Per-block scales, shape ``(n_blocks,)`` with
            ``n_blocks = ceil(numel / blocksize)``: float32, or uint8 codes
            of :func:`dynamic_map` when double quantized.
        shape: Shape of the original tensor.
        dtype: dtype of the original tensor (the default dequantize dtype).
        blocksize: Elements per block.
        absmax_scale: Double quant only: float32 absmax of each group of
            256 centred scales, shape ``(ceil(n_blocks / 256),)``.
        absmax_offset: Double quant only: float32 0-d mean of the scales,
            subtracted before their quantization.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        """Whether the absmax scales are 8-bit quantized."""
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        """Device of the packed data."""
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized tensors (codes, scales, offset)."""
        tensors = [self.packed, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_param(self) -> float:
        """Exact storage cost of this tensor in bits per original element."""
        return 8 * self.nbytes / self.numel

    def scales(self) -> torch.Tensor:
        """Returns the float32 absmax of every block, undoing double quant.

        Returns:
            float32 tensor of shape ``(n_blocks,)``; without double quant it
            is ``absmax`` itself, not a copy.
        """
        if not self.double_quant:
            return self.absmax
        n_blocks = self.absmax.numel()
        n_groups = self.absmax_scale.numel()
        values = _dynamic_map(self.device)[self.absmax.long()]  # (n_blocks,)
        values = torch.nn.functional.pad(values, (0, n_groups * DOUBLE_QUANT_BLOCKSIZE - n_blocks))
        values = values.view(n_groups, DOUBLE_QUANT_BLOCKSIZE) * self.absmax_scale[:, None]  # (n_groups, 256)
        return values.reshape(-1)[:n_blocks] + self.absmax_offset  # (n_blocks,)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Returns the dequantized tensor.

        Each element is ``code_value * absmax`` computed in float32, then cast.

        Args:
            dtype: dtype of the result. Defaults to the original dtype.

        Returns:
            Tensor of the original shape.
        """
        flat = self._dequantize_flat(0, self.numel, self.scales(), dtype or self.dtype)  # (numel,)
        return flat.view(self.shape)

    def dequantize_rows(
        self,
        start: int,
        stop: int,
        dtype: torch.dtype | None = None,
        scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Dequantizes a slice ``[start:stop]`` of the leading dimension.

        Only the blocks overlapping the slice are expanded, so a large weight
        can be dequantized in chunks of rows.

        Args:
            start: First row (index into ``shape[0]``).
            stop: One past the last row.
            dtype: dtype of the result. Defaults to the original dtype.
            scales: The result of :meth:`scales`, to avoid recomputing it per
                chunk. Defaults to computing it.

        Returns:
            Tensor of shape ``(stop - start, *shape[1:])``.

        Raises:
            ValueError: If the tensor is 0-d or ``0 <= start <= stop <= shape[0]``
                does not hold.
        """
        if len(self.shape) == 0 or not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"bad row range [{start}, {stop}) for shape {tuple(self.shape)}")
        row_numel = math.prod(self.shape[1:])
        scales = self.scales() if scales is None else scales
        flat = self._dequantize_flat(start * row_numel, stop * row_numel, scales, dtype or self.dtype)
        return flat.view(stop - start, *self.shape[1:])

    def _dequantize_flat(
        self, begin: int, end: int, scales: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Values of flat elements ``[begin, end)`` in ``dtype``, shape ``(end - begin,)``.

        Each value is ``code * absmax`` computed in float32 and rounded once
        to ``dtype``: the product is written straight into a ``dtype`` tensor.
        """
        bs = self.blocksize
        first_block, last_block = begin // bs, -(-end // bs)
        lo, hi = first_block * bs, min(last_block * bs, self.numel)  # whole blocks covering the range
        packed = self.packed[lo // 2 : (hi + 1) // 2]  # (n_bytes,)
        # a row gather with int32 indices: on CPU about 3x faster than indexing with int64
        byte_values = torch.nn.functional.embedding(packed.int(), _nf4_pair_table(self.device))  # (n_bytes, 2)
        values = byte_values.view(-1)[lo % 2 : lo % 2 + hi - lo]  # (hi - lo,)
        if (last_block - first_block) * bs > hi - lo:  # short tail block
            values = torch.nn.functional.pad(values, (0, (last_block - first_block) * bs - (hi - lo)))
        blocks = values.view(-1, bs)  # (n_blocks_in_range, bs)
        out = torch.empty(blocks.shape, dtype=dtype, device=blocks.device)
        torch.mul(blocks, scales[first_block:last_block, None], out=out)  # float32 product, one rounding
        return out.view(-1)[begin - lo : end - lo]

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Flattens to a dict of tensors (e.g. for safetensors).

        Returns:
            ``packed``, ``absmax``, ``shape`` (int64 ``(ndim,)``),
            ``blocksize`` (int64 0-d), ``dtype`` (int64 0-d code), and with
            double quant ``absmax_scale`` and ``absmax_offset``.
        """
        out = {
            "packed": self.packed,
            "absmax": self.absmax,
            "shape": torch.tensor(list(self.shape), dtype=torch.int64),
            "blocksize": torch.tensor(self.blocksize, dtype=torch.int64),
            "dtype": torch.tensor(_DTYPE_CODES[self.dtype], dtype=torch.int64),
        }
        if self.double_quant:
            out["absmax_scale"] = self.absmax_scale
            out["absmax_offset"] = self.absmax_offset
        return out

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> NF4Tensor:
        """Rebuilds an :class:`NF4Tensor` from :meth:`to_dict` output.

        Args:
            tensors: The dict; extra keys are ignored.

        Returns:
            The quantized tensor (sharing the given tensors, no copy).

        Raises:
            KeyError: If a required key is missing.
            ValueError: If the tensor sizes are inconsistent.
        """
        shape = torch.Size(int(s) for s in tensors["shape"].tolist())
        qt = cls(
            packed=tensors["packed"],
            absmax=tensors["absmax"],
            shape=shape,
            dtype=_CODE_DTYPES[int(tensors["dtype"])],
            blocksize=int(tensors["blocksize"]),
            absmax_scale=tensors.get("absmax_scale"),
            absmax_offset=tensors.get("absmax_offset"),
        )
        qt._validate()
        return qt

    def _validate(self) -> None:
        n, bs = self.numel, self.blocksize
        _check_blocksize(bs)
        n_blocks = -(-n // bs)
        expected = {"packed": (n + 1) // 2, "absmax": n_blocks}
        if self.double_quant:
            expected["absmax_scale"] = -(-n_blocks // DOUBLE_QUANT_BLOCKSIZE)
            if self.absmax_offset is None or self.absmax_offset.numel() != 1:
                raise ValueError("double-quantized NF4Tensor needs a 1-element absmax_offset")
        for name, size in expected.items():
            if getattr(self, name).numel() != size:
                raise ValueError(f"{name} has {getattr(self, name).numel()} elements, expected {size}")


# --------------------------------------------------------------------------- #
# Quantization
# --------------------------------------------------------------------------- #


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantizes a float tensor to NF4, byte-exact with bitsandbytes on CPU.

    Args:
        weight: Floating-point tensor of any shape with at least one element
            (typically ``(out_features, in_features)``); float32, float16,
            bfloat16 or float64. Quantized on its own device.
        blocksize: Elements per absmax block, taken over the row-major
            flattened tensor. Defaults to 64. bitsandbytes accepts only
            powers of two from 32 to 4096; any positive int works here.
        double_quant: Also quantize the absmax scales to 8 bits (bitsandbytes'
            ``compress_statistics=True``). Defaults to False.

    Returns:
        The :class:`NF4Tensor`.

    Raises:
        TypeError: If ``weight`` has an unsupported dtype.
        ValueError: If ``blocksize`` is not positive, ``weight`` is empty, or
            it holds a NaN or an infinity.
    """
    if weight.dtype not in _DTYPE_CODES:
        raise TypeError(f"NF4 quantizes float32/float16/bfloat16/float64 tensors, got {weight.dtype}")
    _check_blocksize(blocksize)
    n = weight.numel()
    if n == 0:
        raise ValueError("cannot quantize an empty tensor")

    flat = weight.detach().reshape(-1).float()  # (n,)
    n_full = n - n % blocksize
    blocks = flat[:n_full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_full_blocks,)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).view(-1)  # (n_full,)
    if n_full < n:  # short tail block: divided, and its absmax stays clamped
        tail = flat[n_full:]  # (n - n_full,)
        tail_absmax = tail.abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])  # (n_blocks,)
        scaled = torch.cat([scaled, torch.clamp(tail / tail_absmax, -1, 1)])  # (n,)
    if not torch.isfinite(absmax).all():
        raise ValueError("cannot quantize a tensor holding NaN or infinity")
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # (n + 1,): the pad element gets code 7
    codes = torch.bucketize(scaled, _nf4_bounds(flat.device), out_int32=True).to(torch.uint8)  # (2 * n_bytes,)
    packed = (codes[0::2] << 4) | codes[1::2]  # (n_bytes,)

    qt = NF4Tensor(packed=packed, absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize)
    if double_quant:
        qt.absmax_offset = absmax.mean()
        qt.absmax, qt.absmax_scale = _quantize_dynamic_8bit(absmax - qt.absmax_offset)
    return qt


def _quantize_dynamic_8bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the dynamic map, as bitsandbytes' CPU kernel.

    Args:
        values: float32, shape ``(n,)``.

    Returns:
        ``(codes, absmax)``: uint8 ``(n,)`` indices into :func:`dynamic_map`
        and float32 ``(ceil(n / 256),)`` block absmax.
    """
    n, bs = values.numel(), DOUBLE_QUANT_BLOCKSIZE
    n_blocks = -(-n // bs)
    blocks = torch.nn.functional.pad(values, (0, n_blocks * bs - n)).view(n_blocks, bs)  # (n_blocks, 256)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    zero_block = absmax == 0
    normed = torch.clamp(blocks * (1.0 / absmax.masked_fill(zero_block, 1.0))[:, None], -1, 1)
    grid_index = ((normed + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation, (n_blocks, 256)
    codes = _dynamic_map_lut(values.device)[grid_index]  # (n_blocks, 256)
    codes = codes.masked_fill(zero_block[:, None], 0)
    return codes.view(-1)[:n], absmax
