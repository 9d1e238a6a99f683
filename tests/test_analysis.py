"""lorakit.analysis: adapter spectra against a direct SVD of ΔW, and extraction of an adapter from
a fully fine-tuned model (tiny random Llama models saved to tmp_path)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.analysis import delta_singular_values, extract, inspect_adapter, spectrum_summary
from lorakit.cli import main
from lorakit.adapter_format import read_adapter

from conftest import tiny_llama


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(path)
    return path


def saved_adapter(base_dir, path, **config):
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                           LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(path)
    return model


# --- spectra ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear"),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 2},
         alpha_pattern={"q_proj": 3}),
])
def test_spectra_equal_full_svd(base_dir, tmp_path, capsys, config):
    model = saved_adapter(base_dir, tmp_path / "adapter", **config)
    report = inspect_adapter(str(tmp_path / "adapter"), base=str(base_dir))
    layers = {layer["module"]: layer for layer in report["layers"]}
    wrappers = dict(model.base_model.lora_layers())
    assert set(layers) == set(wrappers)
    for path, wrapper in wrappers.items():
        delta = wrapper.delta_weight("default").double()  # scaling·B·A, (out, in)
        expected = torch.linalg.svdvals(delta)[:wrapper.adapters["default"].r]
        got = torch.tensor(layers[path]["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
        assert layers[path]["delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-6)
        base_norm = float(wrapper.base_layer.weight.double().norm())
        assert layers[path]["relative_norm"] == pytest.approx(float(delta.norm()) / base_norm, rel=1e-6)
    out = capsys.readouterr().out
    assert "singular values of ΔW" in out and "||ΔW||/||W||" in out


def test_parameter_counts_and_file(base_dir, tmp_path, capsys):
    saved_adapter(base_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    report = inspect_adapter(str(tmp_path / "adapter"), top_k=2)
    # tiny_llama: hidden 32, kv 2 heads x 8 = 16. q: A 4x32 + B 32x4 = 256, v: A 4x32 + B 16x4 = 192; 2 layers
    assert report["params"]["by_module_type"] == {"q_proj": {"tensors": 4, "params": 512},
                                                  "v_proj": {"tensors": 4, "params": 384}}
    assert report["params"]["total"] == 896
    assert report["file"]["bytes"] == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert report["config"]["r"] == 4 and report["top_k"] == 2
    assert all(layer["relative_norm"] is None for layer in report["layers"])
    out = capsys.readouterr().out
    assert "q_proj" in out and "top-2" in out and "896" in out


def test_json_and_plot(base_dir, tmp_path, capsys):
    saved_adapter(base_dir, tmp_path / "adapter", r=4, target_modules=["q_proj", "v_proj"])
    assert main(["inspect", str(tmp_path / "adapter"), "--json", "--plot", str(tmp_path / "spectra.png")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["layers"]) == 4 and data["plot"].endswith("spectra.png")
    assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_core_svd_matches_for_every_shape():
    torch.manual_seed(0)
    for out_features, in_features, r in [(50, 40, 8), (3, 40, 8), (50, 5, 8), (6, 6, 6)]:
        a, b = torch.randn(r, in_features), torch.randn(out_features, r)
        expected = torch.linalg.svdvals(0.5 * b.double() @ a.double())[:min(out_features, in_features, r)]
        torch.testing.assert_close(delta_singular_values(a, b, 0.5), expected)


def test_effective_rank_definitions():
    flat = spectrum_summary("x.q_proj", 4, 1.0, torch.ones(4, dtype=torch.float64), top_k=2)
    assert flat.effective_rank == pytest.approx(4.0) and flat.rank_99 == 4 and flat.top_k_energy == pytest.approx(0.5)
    single = spectrum_summary("x.q_proj", 4, 1.0, torch.tensor([3.0, 0, 0, 0], dtype=torch.float64), top_k=2)
    assert single.effective_rank == pytest.approx(1.0) and single.rank_99 == 1 and single.top_k_energy == 1.0
    # energies 100, 0.5: the first holds 99.5% >= 99%
    two = spectrum_summary("x.q_proj", 2, 1.0, torch.tensor([10.0, 0.5 ** 0.5], dtype=torch.float64), top_k=1)
    assert two.rank_99 == 1 and two.module_type == "q_proj"
    zero = spectrum_summary("x.v_proj", 2, 1.0, torch.zeros(2, dtype=torch.float64), top_k=1)
    assert zero.effective_rank == 0 and zero.delta_norm == 0


def test_bad_arguments(base_dir, tmp_path):
    saved_adapter(base_dir, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="top_k"):
        inspect_adapter(str(tmp_path / "adapter"), top_k=0)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        inspect_adapter(str(tmp_path / "adapter"), base=str(tmp_path))
    assert main(["inspect", str(tmp_path / "missing")]) == 2


# --- extract ----------------------------------------------------------------------------------------

def tuned_copy(base_dir, path, rank: int | None, targets=("q_proj", "v_proj"), seed=1):
    """Save the base model with every target Linear changed by a random ΔW of the given rank
    (None: full rank)."""
    model = LlamaForCausalLM.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets:
                out_features, in_features = module.weight.shape
                k = rank or min(out_features, in_features)
                u, v = torch.randn(out_features, k, generator=g), torch.randn(k, in_features, generator=g)
                module.weight += 0.05 * u @ v / k  # (out, k) @ (k, in)
    model.save_pretrained(path)
    return model.eval()


def test_extract_exact_low_rank_change(base_dir, tmp_path):
    tuned = tuned_copy(base_dir, tmp_path / "tuned", rank=3)
    result = extract(str(base_dir), str(tmp_path / "tuned"), r=3, out=str(tmp_path / "adapter"))
    assert result["target_modules"] == ["q_proj", "v_proj"]  # the changed Linears, found by default
    assert len(result["layers"]) == 4
    assert max(layer["relative_error"] for layer in result["layers"]) < 1e-7
    assert result["not_represented"] == []
    config, _ = read_adapter(tmp_path / "adapter")
    assert (config.r, config.lora_alpha) == (3, 3)
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, tuned(ids).logits, atol=1e-5, rtol=1e-5)


def test_extract_error_falls_with_rank(base_dir, tmp_path):
    tuned_copy(base_dir, tmp_path / "tuned", rank=None, targets=("q_proj", "o_proj"))
    errors = []
    for r in (1, 2, 4, 8, 16, 32):
        result = extract(str(base_dir), str(tmp_path / "tuned"), r=r, out=str(tmp_path / f"r{r}"),
                         target_modules=["q_proj", "o_proj"])
        errors.append(max(layer["relative_error"] for layer in result["layers"]))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:-1]))
    assert errors[0] > 0.5 and errors[-1] < 1e-7  # r = 32 = min(out, in): exact


def test_extract_reports_what_it_cannot_represent(base_dir, tmp_path, capsys):
    model = tuned_copy(base_dir, tmp_path / "tuned", rank=2, targets=("q_proj",))
    with torch.no_grad():
        model.model.norm.weight += 0.1
    model.save_pretrained(tmp_path / "tuned")
    result = extract(str(base_dir), str(tmp_path / "tuned"), r=2, out=str(tmp_path / "adapter"),
                     target_modules=["k_proj", "q_proj"])
    assert [item["tensor"] for item in result["not_represented"]] == ["model.norm.weight"]
    k_errors = [layer["relative_error"] for layer in result["layers"] if layer["module"].endswith("k_proj")]
    assert k_errors == [0.0, 0.0]  # unchanged layers: zero factors, no error
    assert "not represented by the adapter" in capsys.readouterr().out


def test_extract_errors(base_dir, tmp_path):
    with pytest.raises(ValueError, match="nothing to extract"):
        extract(str(base_dir), str(base_dir), r=2, out=str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="r must be"):
        extract(str(base_dir), str(base_dir), r=0, out=str(tmp_path / "adapter"))
    with pytest.raises(FileNotFoundError):
        extract(str(base_dir), str(tmp_path), r=2, out=str(tmp_path / "adapter"))
