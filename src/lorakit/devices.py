"""Which device and dtype a command runs on: `--device auto|cpu|cuda|mps`, `--dtype auto|bf16|fp16|fp32`.

    device = resolve_device("auto")            # cuda when present, then mps, then cpu
    dtype = resolve_dtype("auto", device)      # bf16 on CUDA, fp32 elsewhere

Under torchrun each process takes `cuda:LOCAL_RANK` (`resolve_device(..., local_rank=k)`).
A device that is not there is a `DeviceError` naming what is, which the CLI prints as one line.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
DtypeName = Literal["auto", "bf16", "fp16", "fp32"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class DeviceError(ValueError):
    """The requested device is unknown or not available on this machine."""


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available() -> list[str]:
    """The device types this machine can run on, best first."""
    return (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if _mps_available() else []) + ["cpu"]


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device for `name`.

    Args:
        name: "auto" (CUDA when present, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps".
        local_rank: This process's index on its machine under torchrun: CUDA becomes
            `cuda:local_rank`. Default: the first (or the given) CUDA device.

    Raises:
        DeviceError: an unknown name, or a device this machine does not have.
    """
    kind = available()[0] if name == "auto" else name.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or mps")
    if kind not in available():
        raise DeviceError(f"--device {name}: this machine has no {kind.upper()} device (available: "
                          f"{', '.join(available())}); use --device auto or cpu")
    if kind != "cuda":
        return torch.device(kind)
    index = int(name.split(":")[1]) if ":" in name else (local_rank or 0)
    if index >= torch.cuda.device_count():
        raise DeviceError(f"cuda:{index} does not exist: this machine has {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The base model's dtype: "auto" is bf16 on CUDA (fp16 where bf16 is unsupported), fp32 elsewhere.

    Raises:
        DeviceError: an unknown dtype name.
    """
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}: use auto, bf16, fp16 or fp32")
    return DTYPES[name]


def autocast(device: torch.device, precision: str):
    """The device's autocast for `precision` ("bf16" or "fp16"), or a no-op for "fp32"."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def distributed_backend(device: torch.device) -> str:
    """nccl for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"
