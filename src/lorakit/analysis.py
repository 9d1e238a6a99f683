"""Looking inside LoRA adapters, and turning a full fine-tune into one.

Usage: lorakit inspect ADAPTER_DIR [--base MODEL_DIR] [--top-k 4] [--plot spectra.png] [--json]
       lorakit extract BASE_DIR TUNED_DIR R OUT_DIR [--target-modules q_proj,v_proj]

`inspect_adapter` reads an adapter folder (through `lorakit.adapter_format.read_adapter`, no model needed)
and reports its config, its parameters per module type, its file size, and for every adapted
layer the spectrum of the update ΔW = scaling·B·A: singular values, effective rank, the energy
share of the top k directions and, given the base model, ||ΔW||_F / ||W||_F.

`extract` does the reverse of merging: for each target Linear of a model it takes the change
W_tuned − W_base of a fully fine-tuned model, keeps its best rank-r approximation (truncated
SVD, Eckart–Young) and saves it as a LoRA adapter of the base model.
"""

from __future__ import annotations

import io as io_bytes
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .files import atomic_write
from .adapter_format import (PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, module_of_file_key, parse_factor_key,
                             read_adapter)

ENERGY_RANK_THRESHOLD = 0.99  # r99: directions holding 99% of ||ΔW||_F²


# --- the spectrum of one update ----------------------------------------------------------------

def delta_singular_values(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of ΔW = scaling·B·A without forming ΔW, largest first (float64).

    With B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR; Q with orthonormal columns),
    ΔW = Q_B·(scaling·R_B·R_Aᵀ)·Q_Aᵀ, so ΔW and the small r x r core share their singular values.

    Args:
        lora_A: (r, in) — or (r, in, k, ...) for a Conv, (r, num_embeddings) for an Embedding.
        lora_B: (out, r) — or (out, r, 1, ...) for a Conv, (dim, r) for an Embedding.
        scaling: lora_alpha / r (or / sqrt(r) with rsLoRA).

    Returns:
        (min(r, in, out),) singular values.
    """
    a = lora_A.reshape(lora_A.shape[0], -1).double()  # (r, in)
    b = lora_B.reshape(lora_B.shape[0], -1).double()  # (out, r)
    r_b = torch.linalg.qr(b, mode="r").R  # (min(out, r), r)
    r_a = torch.linalg.qr(a.T, mode="r").R  # (min(in, r), r)
    core = scaling * r_b @ r_a.T  # (min(out, r), min(in, r))
    return torch.linalg.svdvals(core)


@dataclass
class Spectrum:
    """Summary numbers of one layer's update."""

    module: str  # path in the model, e.g. model.layers.0.self_attn.q_proj
    module_type: str  # last path segment, e.g. q_proj
    r: int
    scaling: float
    singular_values: list[float]
    effective_rank: float  # exp(entropy of σ/Σσ) (Roy & Vetterli 2007); r for a flat spectrum, 1 for one direction
    rank_99: int  # fewest directions holding 99% of ||ΔW||_F²
    top_k_energy: float  # share of ||ΔW||_F² in the top k directions
    delta_norm: float  # ||ΔW||_F
    base_norm: Optional[float] = None  # ||W||_F, with a base model
    relative_norm: Optional[float] = None  # ||ΔW||_F / ||W||_F


def spectrum_summary(module: str, r: int, scaling: float, sigma: torch.Tensor, top_k: int) -> Spectrum:
    """Effective ranks and energy shares of singular values `sigma` (largest first)."""
    energy = sigma.pow(2)
    total = float(energy.sum())
    if total == 0.0:  # ΔW = 0 (e.g. B still at its zero init)
        return Spectrum(module, module.rsplit(".", 1)[-1], r, scaling, sigma.tolist(), 0.0, 0, 0.0, 0.0)
    p = sigma / sigma.sum()
    p = p[p > 0]
    effective = math.exp(float(-(p * p.log()).sum()))
    cumulative = energy.cumsum(0) / total
    rank_99 = int((cumulative < ENERGY_RANK_THRESHOLD - 1e-12).sum()) + 1
    return Spectrum(module=module, module_type=module.rsplit(".", 1)[-1], r=r, scaling=scaling,
                    singular_values=sigma.tolist(), effective_rank=effective, rank_99=min(rank_99, len(sigma)),
                    top_k_energy=float(energy[:top_k].sum()) / total, delta_norm=math.sqrt(total))


# --- weights of a model folder, tensor by tensor ------------------------------------------------

class ModelWeights:
    """Read single tensors of a `save_pretrained` model folder (safetensors, sharded or not).

    Args:
        folder: Folder holding model.safetensors or model.safetensors.index.json.

    Raises:
        FileNotFoundError: no safetensors weights there.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        root = Path(folder)
        index, single = root / "model.safetensors.index.json", root / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: root / name for key, name in weight_map.items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.files = {key: single for key in f.keys()}
        else:
            raise FileNotFoundError(f"{root} holds no model.safetensors (or its index); "
                                    "only safetensors model folders are read")
        self.folder = root

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under `key`.

        Raises:
            KeyError: no such tensor in the folder.
        """
        from safetensors import safe_open

        if key not in self.files:
            raise KeyError(f"{self.folder} has no tensor {key!r}")
        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)


# --- inspect ------------------------------------------------------------------------------------

def adapter_factors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A, B)} from an adapter file's tensors, in file order.

    Raises:
        ValueError: a module has an A factor without a B factor or the reverse.
    """
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        factor = parse_factor_key(key)
        if factor is not None and factor.leaf != "bias":
            halves.setdefault(factor.module, {})[factor.factor] = tensor
    broken = [path for path, pair in halves.items() if set(pair) != {"A", "B"}]
    if broken:
        raise ValueError(f"adapter has unpaired LoRA factors for {broken[:3]}")
    return {path: (pair["A"], pair["B"]) for path, pair in halves.items()}


def _module_type(key: str) -> str:
    """Group name of a file key for the parameter count: the owning module's last name
    (q_proj for `...q_proj.lora_A.weight`, `...q_proj.lora_B.bias` and `...q_proj.bias`)."""
    return module_of_file_key(key).rsplit(".", 1)[-1]


def inspect_adapter(adapter: str, base: Optional[str] = None, top_k: int = 4, plot: Optional[str] = None,
                    as_json: bool = False) -> dict[str, Any]:
    """Report an adapter's config, parameters, file size and the spectrum of every layer's update.

    Args:
        adapter: Adapter folder (adapter_config.json + adapter_model.safetensors).
        base: Base model folder (safetensors); adds ||ΔW||_F / ||W||_F per layer.
        top_k: Report the share of ||ΔW||_F² held by the top k singular directions.
        plot: Write a PNG of the singular values of every layer to this path.
        as_json: Print the report as JSON instead of text.

    Returns:
        The report (what --json prints).

    Raises:
        AdapterLoadError: the adapter folder cannot be read.
        FileNotFoundError: `base` holds no safetensors weights.
        ValueError: top_k < 1, or the base model lacks an adapted layer's weight.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    config, tensors = read_adapter(adapter, allow_pickle=False)
    weights_file = Path(adapter) / WEIGHTS_NAME
    base_weights = ModelWeights(base) if base else None

    params: dict[str, dict[str, int]] = {}
    for key, tensor in tensors.items():
        group = params.setdefault(_module_type(key), {"tensors": 0, "params": 0})
        group["tensors"] += 1
        group["params"] += tensor.numel()

    layers = []
    for path, (lora_a, lora_b) in adapter_factors(tensors).items():
        r = lora_a.shape[0]
        alpha = config.alpha_for(path)
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        spectrum = spectrum_summary(path, r, scaling, delta_singular_values(lora_a, lora_b, scaling), top_k)
        if base_weights is not None:
            key = path + ".weight"
            if key not in base_weights:
                raise ValueError(f"base model {base} has no weight {key!r} for adapted layer {path}")
            spectrum.base_norm = float(base_weights.get(key).double().norm())
            spectrum.relative_norm = spectrum.delta_norm / spectrum.base_norm if spectrum.base_norm else math.inf
        layers.append(spectrum)

    report = {
        "adapter": str(adapter),
        "config": config.to_dict(),
        "file": {"name": weights_file.name if weights_file.is_file() else PICKLE_WEIGHTS_NAME,
                 "bytes": weights_file.stat().st_size if weights_file.is_file() else None},
        "params": {"by_module_type": params, "total": sum(g["params"] for g in params.values())},
        "top_k": top_k,
        "layers": [asdict(s) for s in layers],
    }
    if plot:
        plot_spectra(layers, plot, title=f"{adapter}: singular values of ΔW")
        report["plot"] = str(plot)
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The text form of `inspect_adapter`'s report."""
    config = report["config"]
    file_bytes = report["file"]["bytes"]
    size = "" if file_bytes is None else f", {file_bytes:,} bytes ({file_bytes / 2**20:.3g} MiB)"
    lines = [f"adapter: {report['adapter']}  ({report['file']['name']}{size})"]
    defaults = _default_config_dict()
    shown = {k: v for k, v in config.items() if k in ("r", "lora_alpha", "target_modules") or v != defaults.get(k)}
    lines.append("config: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    lines += ["", f"{'parameters':24s}{'tensors':>8s}{'params':>14s}"]
    for group, counts in report["params"]["by_module_type"].items():
        lines.append(f"  {group:22s}{counts['tensors']:8d}{counts['params']:14,d}")
    lines.append(f"  {'total':22s}{'':8s}{report['params']['total']:14,d}")
    k = report["top_k"]
    with_base = any(layer["relative_norm"] is not None for layer in report["layers"])
    lines += ["", "singular values of ΔW = scaling·B·A per layer (σ1 largest; eff.rank = exp(entropy of σ/Σσ); "
                  "r99 = directions holding 99% of ||ΔW||²)"]
    header = (f"{'layer':46s}{'r':>4s}{'σ1':>10s}{'σ_r':>10s}{'eff.rank':>9s}{'r99':>5s}{f'top-{k}':>8s}"
              f"{'||ΔW||':>10s}")
    if with_base:
        header += f"{'||ΔW||/||W||':>14s}"
    lines.append(header)
    for layer in report["layers"]:
        sigma = layer["singular_values"]
        row = (f"{layer['module'][-46:]:46s}{layer['r']:4d}{sigma[0]:10.4g}{sigma[-1]:10.4g}"
               f"{layer['effective_rank']:9.2f}{layer['rank_99']:5d}{layer['top_k_energy']:8.1%}"
               f"{layer['delta_norm']:10.4g}")
        if with_base:
            row += f"{layer['relative_norm']:14.4g}"
        lines.append(row)
    if report.get("plot"):
        lines += ["", f"spectra plotted to {report['plot']}"]
    return "\n".join(lines)


def _default_config_dict() -> dict[str, Any]:
    from .config import LoraConfig

    return LoraConfig().to_dict()


def plot_spectra(layers: list[Spectrum], path: str, title: str = "singular values of ΔW") -> None:
    """Write a PNG: singular values (log scale) against their index, one line per layer,
    one colour per module type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted({layer.module_type for layer in layers})
    colours = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(types)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer in layers:
        sigma = [s for s in layer.singular_values if s > 0]
        if sigma:
            ax.plot(range(1, len(sigma) + 1), sigma, color=colours[layer.module_type], alpha=0.6, marker=".")
    for t in types:
        ax.plot([], [], color=colours[t], label=t)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io_bytes.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write(Path(path), png.getvalue())


# --- extract ------------------------------------------------------------------------------------

def truncated_factors(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-r factors of `delta`, splitting √S across both: B = U_r·√S_r, A = √S_r·V_rᵀ.

    Args:
        delta: (out, in) weight change.
        r: Rank kept.

    Returns:
        (A: (r, in), B: (out, r), relative error ||delta − B·A||_F / ||delta||_F), in float64.
        If r exceeds min(out, in), the extra rows of A and columns of B are zero.
    """
    out_features, in_features = delta.shape
    # float64 for accuracy; float32 for very large matrices, where float64 SVD gets slow
    work = delta.double() if delta.numel() <= 2**24 else delta.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)  # u: (out, k), s: (k,), vh: (k, in)
    k = min(r, s.numel())
    root = s[:k].sqrt()
    a = torch.zeros(r, in_features, dtype=torch.float64)
    b = torch.zeros(out_features, r, dtype=torch.float64)
    a[:k] = (root[:, None] * vh[:k]).double()  # (k, in)
    b[:, :k] = (u[:, :k] * root[None, :]).double()  # (out, k)
    total = float(s.double().pow(2).sum())
    error = math.sqrt(float(s[k:].double().pow(2).sum()) / total) if total > 0 else 0.0
    return a, b, error


def extract(base: str, tuned: str, r: int, out: str, target_modules: Optional[list[str]] = None) -> dict[str, Any]:
    """Approximate a fully fine-tuned model's change as a LoRA adapter of its base (truncated SVD).

    For every target Linear, ΔW = W_tuned − W_base is replaced by its best rank-r approximation
    B·A (B = U_r·√S_r, A = √S_r·V_rᵀ, lora_alpha = r so the scaling is 1). Changes outside the
    target Linears (embeddings, norms, head) are not represented; they are reported.

    Args:
        base: Base model folder (transformers save_pretrained, safetensors).
        tuned: Fully fine-tuned model folder with the same architecture.
        r: Rank of the adapter.
        out: Folder to write the adapter to.
        target_modules: Linear names to extract (e.g. q_proj,v_proj). Default: every Linear
            except the output head whose weight changed.

    Returns:
        {"adapter": out, "r": r, "layers": [{module, relative_error, delta_norm}], "not_represented": [...]}.

    Raises:
        FileNotFoundError: a folder holds no safetensors weights.
        ValueError: r < 1, the two models differ in shape, or the targets match nothing.
    """
    from transformers import AutoModelForCausalLM

    from .config import LoraConfig
    from .peft_model import get_peft_model
    from .targeting import output_head_path

    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    tuned_weights = ModelWeights(tuned)
    ModelWeights(base)  # fail early, with the same message, if base is not a model folder
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    head = output_head_path(model)
    linears = {path for path, module in model.named_modules() if isinstance(module, torch.nn.Linear) and path != head}

    deltas: dict[str, torch.Tensor] = {}  # state key -> tuned − base, for every tensor that changed
    relative: dict[str, float] = {}  # state key -> ||Δ||_F / ||W||_F
    for key, base_tensor in model.state_dict().items():
        if key not in tuned_weights:
            continue
        tuned_tensor = tuned_weights.get(key)
        if tuned_tensor.shape != base_tensor.shape:
            raise ValueError(f"{key}: base {tuple(base_tensor.shape)} vs tuned {tuple(tuned_tensor.shape)}; "
                             "the two models must share their architecture")
        delta = tuned_tensor.double() - base_tensor.double()
        if delta.abs().max() > 0:
            deltas[key] = delta
            relative[key] = float(delta.norm() / base_tensor.double().norm())

    if target_modules is None:
        target_modules = sorted({key.rsplit(".", 2)[-2] for key in deltas if key.removesuffix(".weight") in linears})
        if not target_modules:
            raise ValueError(f"no Linear weight differs between {base} and {tuned}: nothing to extract")
    config = LoraConfig(r=r, lora_alpha=r, target_modules=list(target_modules), init_lora_weights=False)
    peft_model = get_peft_model(model, config)

    layers = []
    with torch.no_grad():
        for path, layer in peft_model.lora_layers():
            lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
            delta = deltas.get(path + ".weight")
            if delta is None:  # unchanged layer: zero factors, an exact (empty) update
                lora_a.zero_()
                lora_b.zero_()
                layers.append({"module": path, "relative_error": 0.0, "delta_norm": 0.0})
                continue
            a, b, error = truncated_factors(delta, r)
            lora_a.copy_(a.to(lora_a.dtype))
            lora_b.copy_(b.to(lora_b.dtype))
            layers.append({"module": path, "relative_error": error, "delta_norm": float(delta.norm())})
    peft_model.save_pretrained(out)

    adapted = {layer["module"] + ".weight" for layer in layers}
    not_represented = [{"tensor": key, "relative_change": relative[key]} for key in deltas if key not in adapted]
    print(format_extraction(r, list(target_modules), str(out), layers, not_represented))
    return {"adapter": str(out), "r": r, "target_modules": list(target_modules), "layers": layers,
            "not_represented": not_represented}


def format_extraction(r: int, targets: list[str], out: str, layers: list[dict], not_represented: list[dict]) -> str:
    """The text `extract` prints: per-layer errors and what the adapter leaves out."""
    errors = [layer["relative_error"] for layer in layers]
    lines = [f"extracted a rank-{r} adapter ({len(layers)} layers, targets {', '.join(targets)}) to {out}",
             f"{'layer':52s}{'||ΔW||_F':>12s}{'rel. error':>12s}"]
    lines += [f"{layer['module'][-52:]:52s}{layer['delta_norm']:12.4g}{layer['relative_error']:12.2e}"
              for layer in layers]
    lines.append(f"relative error ||ΔW − B·A||_F / ||ΔW||_F: mean {sum(errors) / len(errors):.2e}, "
                 f"max {max(errors):.2e}")
    if not_represented:
        lines.append(f"not represented by the adapter ({len(not_represented)} changed tensors outside the "
                     "targets), e.g.:")
        lines += [f"  {item['tensor']}  ||Δ||/||W|| = {item['relative_change']:.3g}" for item in not_represented[:5]]
    return "\n".join(lines)


inspect_adapter.flag_names = {"as_json": "json"}  # the flag is --json
