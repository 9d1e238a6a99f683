"""Frozen NF4-quantized linear layer, and the pass that puts it into a model.

This module owns :class:`Linear4bit` (the QLoRA base layer: packed NF4
weight and scales as buffers, an optional float bias, a forward that
dequantizes the weight chunk by chunk and a backward that returns only the
input gradient) and :func:`quantize_model`, which swaps every ``nn.Linear``
of a model for one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lorakit.quant.nf4 import DOUBLE_QUANT_BLOCKSIZE, NF4Tensor, quantize_nf4

__all__ = ["DEFAULT_DEQUANT_CHUNK_NUMEL", "Linear4bit", "quantize_model"]

DEFAULT_DEQUANT_CHUNK_NUMEL = 1 << 22
"""Most weight elements dequantized at once by a forward or backward (4 Mi:
16 MiB as float32), so a layer never holds its whole float weight when it
is larger than that."""

# Buffers holding the quantized weight: kept exactly as they are when the
# module is cast to another dtype.
_QUANT_BUFFERS = ("weight", "weight_absmax", "weight_absmax_scale", "weight_absmax_offset")


class _NF4Linear(torch.autograd.Function):
    """``y = x @ W^T`` with ``W`` dequantized from NF4 in chunks of rows.

    Nothing float is saved for backward: the backward dequantizes ``W``
    again, chunk by chunk, to form ``grad_x = grad_y @ W``. ``W`` gets no
    gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: NF4Tensor, chunk_rows: int) -> torch.Tensor:
        # x: (..., in_features) -> (..., out_features)
        ctx.qweight, ctx.chunk_rows = qweight, chunk_rows
        out_features, in_features = qweight.shape
        scales = qweight.scales()  # (n_blocks,) float32
        if chunk_rows >= out_features:
            return torch.nn.functional.linear(x, qweight.dequantize_rows(0, out_features, x.dtype, scales))
        x2d = x.reshape(-1, in_features)  # (m, in)
        out = x2d.new_empty(x2d.shape[0], out_features)  # (m, out)
        for start in range(0, out_features, chunk_rows):
            stop = min(start + chunk_rows, out_features)
            w = qweight.dequantize_rows(start, stop, x.dtype, scales)  # (rows, in)
            out[:, start:stop] = x2d @ w.t()  # (m, rows)
        return out.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        qweight, chunk_rows = ctx.qweight, ctx.chunk_rows
        out_features, in_features = qweight.shape
        scales = qweight.scales()  # (n_blocks,)
        g2d = grad_out.reshape(-1, out_features)  # (m, out)
        grad_x = g2d.new_zeros(g2d.shape[0], in_features)  # (m, in)
        for start in range(0, out_features, chunk_rows):
            stop = min(start + chunk_rows, out_features)
            w = qweight.dequantize_rows(start, stop, grad_out.dtype, scales)  # (rows, in)
            grad_x.addmm_(g2d[:, start:stop], w)  # (m, in)
        return grad_x.view(*grad_out.shape[:-1], in_features), None, None


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in NF4.

    The packed codes and the scales are buffers (``weight``,
    ``weight_absmax`` and with double quant ``weight_absmax_scale``,
    ``weight_absmax_offset``), so ``state_dict()`` / ``load_state_dict()``
    save and restore the quantized form as is. Note that ``weight`` is
    therefore a uint8 tensor of shape ``(ceil(out * in / 2),)``, as in
    bitsandbytes; use :meth:`dequantize` for the float weight. Casting the
    module (``.to(torch.bfloat16)``, ``.half()``) casts the bias only: the
    quantized buffers keep their dtypes.

    The forward dequantizes at most ``dequant_chunk_numel`` weight elements
    at a time (whole rows, at least one), multiplies, and drops them; the
    backward does the same again to return the input gradient. A layer
    smaller than the chunk is dequantized whole, transiently.

    Attributes:
        in_features: Input size.
        out_features: Output size.
        blocksize: NF4 block size.
        double_quant: Whether the scales are 8-bit quantized.
        compute_dtype: dtype of the dequantized weight and of the matmul;
            None means the input's dtype.
        orig_dtype: dtype of the weight before quantization (default of
            :meth:`dequantize`).
        dequant_chunk_numel: Most weight elements dequantized at once.
        bias: Float bias of shape ``(out_features,)``, a frozen parameter
            (``requires_grad=False``), or None.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
        orig_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        """Creates the layer with empty (uninitialised) quantized buffers.

        Fill it with :meth:`load_state_dict`, or build it with
        :meth:`from_linear`.

        Args:
            in_features: Input size.
            out_features: Output size.
            bias: Whether the layer has a bias. Defaults to True.
            blocksize: NF4 block size. Defaults to 64.
            double_quant: Whether the scales are 8-bit quantized. Defaults to False.
            compute_dtype: Matmul dtype; None (default) uses the input's dtype.
            orig_dtype: dtype of the original weight, also that of the bias.
                Defaults to float32.
            device: Device of the buffers. Defaults to the default device.

        Raises:
            ValueError: If a size or ``blocksize`` is not positive.
        """
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"sizes must be positive, got {in_features} x {out_features}")
        if blocksize < 1:
            raise ValueError(f"blocksize must be positive, got {blocksize}")
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant = blocksize, double_quant
        self.compute_dtype, self.orig_dtype = compute_dtype, orig_dtype
        self.dequant_chunk_numel = DEFAULT_DEQUANT_CHUNK_NUMEL

        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("weight", torch.empty((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            n_groups = -(-n_blocks // DOUBLE_QUANT_BLOCKSIZE)
            self.register_buffer("weight_absmax", torch.empty(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("weight_absmax_scale", torch.empty(n_groups, dtype=torch.float32, device=device))
            self.register_buffer("weight_absmax_offset", torch.empty((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("weight_absmax", torch.empty(n_blocks, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=orig_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        """Quantizes an ``nn.Linear`` (on its device) into a new layer.

        Args:
            linear: The layer; its weight ``(out, in)`` and bias are copied,
                not modified.
            blocksize: NF4 block size. Defaults to 64.
            double_quant: 8-bit quantize the scales. Defaults to False.
            compute_dtype: Matmul dtype; None (default) uses the input's dtype.

        Returns:
            The :class:`Linear4bit`.

        Raises:
            ValueError: As :func:`~lorakit.quant.nf4.quantize_nf4`.
            TypeError: As :func:`~lorakit.quant.nf4.quantize_nf4`.
        """
        weight = linear.weight
        qt = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
        layer = cls(  # on "meta": every tensor is set below
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            orig_dtype=weight.dtype,
            device="meta",
        )
        layer.weight, layer.weight_absmax = qt.packed, qt.absmax
        if double_quant:
            layer.weight_absmax_scale, layer.weight_absmax_offset = qt.absmax_scale, qt.absmax_offset
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def quantized_numel(self) -> int:
        """Logical size of the 4-bit weight, ``in_features * out_features``.

        The packed ``weight`` is a buffer, not a parameter, so parameter counts
        (``PeftModel.get_nb_trainable_parameters``) add this instead, as PEFT
        counts a bitsandbytes 4-bit weight by its unpacked size.
        """
        return self.in_features * self.out_features

    @property
    def quantized_weight(self) -> NF4Tensor:
        """The weight as an :class:`NF4Tensor` viewing this layer's buffers."""
        return NF4Tensor(
            packed=self.weight,
            absmax=self.weight_absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.orig_dtype,
            blocksize=self.blocksize,
            absmax_scale=self.weight_absmax_scale if self.double_quant else None,
            absmax_offset=self.weight_absmax_offset if self.double_quant else None,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Returns the float weight (e.g. to merge a LoRA update into).

        Args:
            dtype: dtype of the result. Defaults to ``orig_dtype``.

        Returns:
            Tensor of shape ``(out_features, in_features)``, newly allocated.
        """
        return self.quantized_weight.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes ``x @ W^T + b``.

        Args:
            x: Input of shape ``(..., in_features)``.

        Returns:
            Output of shape ``(..., out_features)`` in ``x``'s dtype (the
            matmul runs in ``compute_dtype`` when it is set).
        """
        dtype = self.compute_dtype or x.dtype
        chunk_rows = max(1, self.dequant_chunk_numel // self.in_features)
        out = _NF4Linear.apply(x.to(dtype), self.quantized_weight, chunk_rows)  # (..., out)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Let .to()/.cuda()/.half() move the quantized tensors but never cast
        # them: re-place the originals on the new device with their own dtype
        # (buffers, or frozen parameters after `make_parameters_shardable`).
        originals = {name: (store, store[name]) for store in (self._buffers, self._parameters)
                     for name in _QUANT_BUFFERS if store.get(name) is not None}
        super()._apply(fn, recurse)
        for name, (store, original) in originals.items():
            moved = store[name]
            if moved.dtype != original.dtype:
                data = original.detach().to(moved.device)
                store[name] = nn.Parameter(data, requires_grad=False) if store is self._parameters else data
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )


def quantize_model(
    model: nn.Module,
    skip: Iterable[str] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replaces every ``nn.Linear`` of a model by a :class:`Linear4bit`, in place.

    Layers are quantized one at a time on their own device, and each
    original is released as soon as it is replaced, so peak memory stays
    about one float layer above the model's. A model that is itself an
    ``nn.Linear`` is left alone (use :meth:`Linear4bit.from_linear`).

    Args:
        model: The model (e.g. a ``transformers`` causal LM, float32 or bf16).
        skip: Names of layers to keep in float, each matched against a
            module's full dotted path or its last component. Defaults to
            ``("lm_head",)``.
        blocksize: NF4 block size. Defaults to 64.
        double_quant: 8-bit quantize the scales. Defaults to False.
        compute_dtype: Matmul dtype of the new layers; None (default) uses
            each input's dtype.

    Returns:
        ``model`` itself, modified.

    Raises:
        ValueError: As :func:`~lorakit.quant.nf4.quantize_nf4`.
        TypeError: As :func:`~lorakit.quant.nf4.quantize_nf4`.
    """
    skip = set(skip)
    targets = [
        name
        for name, module in model.named_modules()
        if name  # the root module itself is never replaced
        and isinstance(module, nn.Linear)
        and name not in skip
        and name.rsplit(".", 1)[-1] not in skip
    ]
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        setattr(parent, child_name, Linear4bit.from_linear(linear, blocksize, double_quant, compute_dtype))
        del linear
    return model


def make_parameters_shardable(layer: Linear4bit) -> None:
    """Re-register the layer's packed weight and its (non-scalar) scales as frozen parameters,
    so that FSDP2, which shards parameters only, splits them across ranks (FSDP-QLoRA). The
    values and state keys are unchanged."""
    for name in ("weight", "weight_absmax", "weight_absmax_scale"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, torch.Tensor) and not isinstance(tensor, nn.Parameter) and tensor.dim() > 0:
            delattr(layer, name)
            layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
