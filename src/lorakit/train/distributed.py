"""Several processes under torchrun: the process group, DDP or FSDP2, and gathering what rank 0 writes.

    ctx = Dist.setup("auto")                       # rank, world, device (cuda:LOCAL_RANK, nccl / cpu, gloo)
    net = shard(peft_model, "fsdp", ctx, "bf16")   # or "ddp"; one process: the model itself
    state = adapter_state(peft_model)              # the adapter's full tensors, on every rank

Strategies:
    ddp   every rank holds the whole model; gradients are averaged after backward.
    fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`) on each decoder layer (the model's
          `_no_split_modules` classes) and on the root: every parameter, the frozen base and the
          LoRA factors alike, is split across ranks (dim 0) and gathered for its layer's forward
          and backward only. A quantized base is sharded too: its format turns its packed
          storage into frozen parameters first (`quant.registry`'s `shardable`).
Gradients are averaged over ranks in both, so the loss scaling of the loop is the same.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import devices
from ..adapter_format import KEY_PREFIX
from ..quant.registry import make_shardable


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 without torchrun) and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this job started the process group (and ends it in `close`)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str = "auto") -> Dist:
        """Resolve the device (cuda:LOCAL_RANK under torchrun) and join the process group.

        Raises:
            devices.DeviceError: the device is not available.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        resolved = devices.resolve_device(device, local_rank=local_rank if world > 1 else None)
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        if world == 1:
            return cls(device=resolved)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(devices.distributed_backend(resolved))
        return cls(dist.get_rank(), world, resolved, owns)

    def sum(self, value: float) -> float:
        """`value` summed over every rank."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def gather(self, value: float) -> list[float]:
        """`value` of every rank, in rank order."""
        if self.world == 1:
            return [value]
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        out = [torch.zeros_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [float(x.item()) for x in out]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Wait for every rank, then end the process group if this job started it (a process
        exiting with the group alive can abort in its teardown)."""
        self.barrier()
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules whose class is in transformers' `_no_split_modules`
    (e.g. LlamaDecoderLayer), outermost first.

    Raises:
        ValueError: the model names no such classes, or none is found.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"--strategy fsdp: cannot find the decoder layers of {type(model).__name__} "
                         "(its _no_split_modules names none of its modules); use --strategy ddp")
    return layers


def shard(peft_model: nn.Module, strategy: str, ctx: Dist, precision: str = "fp32") -> nn.Module:
    """The module the loop calls: `peft_model` itself in one process, else wrapped by `strategy`.

    Args:
        peft_model: The model with its adapter, on `ctx.device`, trainable parameters set.
        strategy: "ddp" or "fsdp".
        ctx: This process's place.
        precision: "bf16"/"fp16": FSDP's mixed-precision policy computes in that dtype and
            reduces gradients in float32 (GPU only; on CPU autocast does the casting).

    Raises:
        ValueError: an unknown strategy, or a model FSDP cannot split into layers.
    """
    if ctx.world == 1:
        return peft_model
    if strategy == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(peft_model, device_ids=ids)
    if strategy != "fsdp":
        raise ValueError(f"unknown strategy {strategy!r}: use ddp or fsdp")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    root = peft_model.get_base_model()
    make_shardable(root)
    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    policy = MixedPrecisionPolicy()
    if ctx.device.type == "cuda" and precision != "fp32":
        policy = MixedPrecisionPolicy(param_dtype=devices.DTYPES[precision], reduce_dtype=torch.float32)
    for layer in decoder_layers(root):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    return peft_model


def is_fsdp(peft_model: nn.Module) -> bool:
    """Whether the model's parameters are FSDP shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in peft_model.parameters())


def no_sync(net: nn.Module, peft_model: nn.Module, sync: bool):
    """A context for one micro-batch: gradients are reduced across ranks only when `sync`."""
    if sync:
        return nullcontext()
    if isinstance(net, nn.parallel.DistributedDataParallel):
        return net.no_sync()
    if is_fsdp(peft_model):
        return _FsdpNoSync(peft_model.get_base_model())
    return nullcontext()


class _FsdpNoSync:
    """FSDP2's form of no_sync: skip the reduce-scatter for this backward."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def __enter__(self) -> None:
        self.root.set_requires_gradient_sync(False)

    def __exit__(self, *exc: Any) -> None:
        self.root.set_requires_gradient_sync(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank calls it), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_state(peft_model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The trainable tensors, whole, on the CPU, keyed as the PeftModel's state dict
    (`base_model.model.<name>`, what `save_pretrained(state_dict=...)` takes). Every rank calls
    this: FSDP shards are gathered, the ranks walk the parameters in the same order. None when
    nothing is sharded (the model's own state dict serves)."""
    if not is_fsdp(peft_model):
        return None
    root = peft_model.get_base_model()
    return {KEY_PREFIX + name: full_tensor(p.detach()).cpu() for name, p in root.named_parameters()
            if p.requires_grad}


def local_base_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base this rank holds: its frozen parameters (its shards of them under
    FSDP) and its buffers (a quantized layer's packed storage, unless made parameters to be
    sharded; replicated on every rank)."""
    total = 0
    for t in [*(p for p in model.parameters() if not p.requires_grad), *model.buffers()]:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def optimizer_state(peft_model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state for a checkpoint: whole tensors by parameter name under FSDP (a
    collective), else `optimizer.state_dict()`."""
    if not is_fsdp(peft_model):
        return {"format": "index", "state": optimizer.state_dict()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"format": "fqn", "state": get_optimizer_state_dict(peft_model.get_base_model(), optimizer, options=options)}


def load_optimizer_state(peft_model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Put `optimizer_state`'s result back (whole tensors are split into this rank's shards).

    Raises:
        ValueError: a checkpoint written under another strategy (index vs name keyed).
    """
    if "format" not in saved:  # a checkpoint written before formats were recorded
        saved = {"format": "index", "state": saved}
    if (saved["format"] == "fqn") != is_fsdp(peft_model):
        raise ValueError("this checkpoint was written under another --strategy (fsdp vs ddp / one process); "
                         "resume it with the strategy it was trained with")
    if saved["format"] == "index":
        optimizer.load_state_dict(saved["state"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(peft_model.get_base_model(), optimizer, saved["state"],
                             options=StateDictOptions(full_state_dict=True))
