"""The variants of issue 8 against PEFT 0.21.2 (the oracle): lora_bias, layers_to_transform /
layers_pattern, the gaussian / PiSSA / OLoRA inits, the PiSSA -> LoRA conversion and
add_weighted_adapter. Outputs and tensors agree within 1e-5 in fp32.
"""

import warnings

import pytest
import torch

import lorakit
from lorakit.layers import LoraLayer

peft = pytest.importorskip("peft")

from conftest import assert_round_trip, eval_logits, perturb_trainables, tiny_gpt2, tiny_llama  # noqa: E402

TOL = 1e-5


def tensors(model):
    """state dict with the adapter name removed from keys, so both libraries' keys agree."""
    return {k.replace(".default", ""): v.detach().float() for k, v in model.state_dict().items()}


def max_diff(a, b):
    assert a and a.keys() == b.keys(), sorted(set(a) ^ set(b))[:6]
    assert all(a[k].shape == b[k].shape for k in a), [k for k in a if a[k].shape != b[k].shape][:6]
    return max((a[k] - b[k]).abs().max().item() for k in a)


def llama_with_bias():
    return tiny_llama(attention_bias=True, mlp_bias=True)


# --- round trips: adapters saved by one library load in the other with the same outputs ---------

ROUND_TRIPS = {
    "llama-lora-bias": (llama_with_bias, dict(target_modules=["q_proj", "v_proj", "down_proj"], lora_bias=True)),
    "llama-lora-bias-no-base-bias": (tiny_llama, dict(target_modules=["q_proj", "o_proj"], lora_bias=True)),
    "gpt2-lora-bias": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], lora_bias=True)),
    "llama-layers-pattern": (tiny_llama, dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0],
                                              layers_pattern="layers")),
    "llama-layer-int-no-pattern": (tiny_llama, dict(target_modules=["v_proj", "gate_proj"], layers_to_transform=1)),
    "llama-layers-empty-list": (tiny_llama, dict(target_modules=["k_proj"], layers_to_transform=[])),
    "llama-layers-full-path-kept": (tiny_llama, dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"],
                                                     layers_to_transform=[1])),
    "llama-layers-pattern-list": (tiny_llama, dict(target_modules=["o_proj"], layers_to_transform=[0, 1],
                                                   layers_pattern=["h", "layers"])),
    "gpt2-layers-pattern": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], layers_to_transform=[1],
                                            layers_pattern="h")),
    "gpt2-layers-no-pattern": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[0])),
    "llama-gaussian": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")),
    "gpt2-gaussian": (tiny_gpt2, dict(target_modules=["c_attn"], init_lora_weights="gaussian")),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_round_trip_both_ways(case, tmp_path, ids):
    make, kwargs = ROUND_TRIPS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: lora_bias on a layer without bias, Conv1D fan_in_fan_out
        ours = lorakit.get_peft_model(make(), lorakit.LoraConfig(r=4, lora_alpha=8, **kwargs))
        theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, **kwargs))
        names = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
        assert names(ours) == names(theirs)  # the same modules, factors and biases train

        assert_round_trip(ours, theirs, make, ids, tmp_path, tol=TOL)


def test_gaussian_init_has_peft_distribution():
    """Same law: A ~ N(0, 1/r²), B = 0, in both libraries (compared by moments, not values)."""
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian")
    stats = []
    for lib in (lorakit, peft):
        state = tensors(lib.get_peft_model(tiny_llama(hidden_size=64, intermediate_size=128), lib.LoraConfig(**config)))
        a = torch.cat([v.flatten() for k, v in state.items() if ".lora_A." in k])
        b = torch.cat([v.flatten() for k, v in state.items() if ".lora_B." in k])
        stats.append((a.mean().item(), a.std().item(), b.abs().max().item()))
    for mean, std, b_max in stats:
        assert abs(mean) < 0.01 and abs(std - 1 / 4) < 0.01 and b_max == 0


# --- PiSSA / OLoRA: the same factors and residual as PEFT -----------------------------------------

INITS = [
    ("llama", tiny_llama, ["q_proj", "v_proj", "down_proj"], "pissa"),
    ("llama", tiny_llama, ["q_proj", "v_proj", "down_proj"], "pissa_niter_2"),
    ("llama", tiny_llama, ["q_proj", "v_proj", "down_proj"], "olora"),
    ("gpt2", tiny_gpt2, ["c_attn", "c_fc"], "pissa"),
    ("gpt2", tiny_gpt2, ["c_attn", "c_fc"], "pissa_niter_2"),
    # (gpt2, olora): PEFT 0.21.2's olora_init ignores fan_in_fan_out, so on a Conv1D it builds A of
    # shape (r, out) and its forward fails; lorakit transposes as for PiSSA (tests/unit/layers/test_init.py).
]


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("arch, make, targets, init", INITS, ids=[f"{a}-{i}" for a, _, _, i in INITS])
def test_weight_init_factors_and_residual_equal_peft(arch, make, targets, init, use_rslora):
    """Same A, B and residual base weight (pissa_niter_K: the same random draws, as both build the
    factors in the same order from the same RNG state)."""
    config = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, use_rslora=use_rslora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lorakit.get_peft_model(make(), lorakit.LoraConfig(**config))
        theirs = peft.get_peft_model(make(), peft.LoraConfig(**config))
    assert max_diff(tensors(ours), tensors(theirs)) <= TOL


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_init_adapter_loads_both_ways_on_the_original_base(init, tmp_path, ids):
    """A saved PiSSA/OLoRA adapter reruns its init on load (both libraries), so on the ORIGINAL base
    it reproduces the trained model."""
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=init)
    for save_lib, load_lib in ((lorakit, peft), (peft, lorakit)):
        trained = save_lib.get_peft_model(tiny_llama(), save_lib.LoraConfig(**config))
        perturb_trainables(trained)
        expected = eval_logits(trained, ids)
        trained.save_pretrained(tmp_path / save_lib.__name__)
        loaded = load_lib.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / save_lib.__name__))
        assert (eval_logits(loaded, ids) - expected).abs().max() <= TOL


# --- PiSSA -> LoRA conversion ------------------------------------------------------------------------

@pytest.mark.parametrize("init, use_rslora", [("pissa", False), ("pissa", True), ("olora", False)])
def test_converted_adapter_equals_peft_conversion_and_runs_on_the_original_base(init, use_rslora, tmp_path, ids):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=init,
                  use_rslora=use_rslora)
    folders = {}
    for lib in (lorakit, peft):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(**config))
        initial = tmp_path / lib.__name__ / "init"
        model.save_pretrained(initial)
        perturb_trainables(model)  # "training": the same values in both (same names, same order)
        expected = eval_logits(model, ids)
        folders[lib] = tmp_path / lib.__name__ / "lora"
        model.save_pretrained(folders[lib], path_initial_model_for_weight_conversion=str(initial))
        # the converted adapter applies to the ORIGINAL base, in either library
        for loader in (lorakit, peft):
            loaded = loader.PeftModel.from_pretrained(tiny_llama(), str(folders[lib]))
            assert (eval_logits(loaded, ids) - expected).abs().max() <= TOL, (lib.__name__, loader.__name__)
    ours_config, ours = lorakit.adapter_format.read_adapter(folders[lorakit])
    theirs_config, theirs = lorakit.adapter_format.read_adapter(folders[peft])
    assert max_diff(ours, theirs) <= TOL
    assert (ours_config.r, ours_config.init_lora_weights) == (8, True)
    assert (theirs_config.r, theirs_config.init_lora_weights) == (8, True)
    assert ours_config.lora_alpha == pytest.approx(theirs_config.lora_alpha)


# --- add_weighted_adapter ----------------------------------------------------------------------------

def deltas(model, name):
    """{module path: scaling · B @ A} of adapter `name` (PEFT's get_delta_weight / lorakit's delta_weight)."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in module.adapters:
            out[path] = module.delta_weight(name)
        elif isinstance(module, peft.tuners.lora.LoraLayer) and name in module.lora_A:
            out[path] = module.get_delta_weight(name).float()
    return out


COMBINATIONS = [
    ("cat", [4, 2], [1.0, 0.5], {}),
    ("cat", [4, 2], [0.7, -1.3], {}),
    ("svd", [4, 2], [1.0, 0.5], {}),
    ("svd", [4, 2], [1.0, -0.5], dict(svd_rank=3)),
    ("svd", [4, 2], [1.0, 0.5], dict(svd_clamp=0.9)),
    ("linear", [4, 4], [0.6, 0.4], {}),
    ("linear", [4, 4], [1.0, -0.5], {}),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("combination_type, ranks, weights, svd", COMBINATIONS)
def test_add_weighted_adapter_equals_peft(arch, combination_type, ranks, weights, svd, tmp_path, ids):
    """Two adapters made in PEFT (overlapping targets, different alphas) are combined in both
    libraries: the same combined ΔW per layer, the same config, and each library loads the
    other's combined adapter with the same outputs."""
    make, targets = (tiny_llama, (["q_proj", "v_proj"], ["v_proj", "up_proj"])) if arch == "llama" \
        else (tiny_gpt2, (["c_attn"], ["c_attn", "c_fc"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft.LoraConfig(r=ranks[0], lora_alpha=8, target_modules=targets[0],
                                                             init_lora_weights=False), adapter_name="a")
        theirs.add_adapter("b", peft.LoraConfig(r=ranks[1], lora_alpha=3, target_modules=targets[1],
                                                init_lora_weights=False))
        theirs.save_pretrained(tmp_path / "inputs")
        ours = lorakit.PeftModel.from_pretrained(make(), str(tmp_path / "inputs" / "a"), adapter_name="a")
        ours.load_adapter(str(tmp_path / "inputs" / "b"), adapter_name="b")

        theirs.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination_type, **svd)
        ours.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination_type, **svd)
        ours_deltas, theirs_deltas = deltas(ours, "mix"), deltas(theirs, "mix")
        assert len(ours_deltas) == (6 if arch == "llama" else 4)  # q, v, up / c_attn, c_fc; 2 layers
        assert max_diff(ours_deltas, theirs_deltas) <= TOL
        ours_config, theirs_config = ours.peft_config["mix"], theirs.peft_config["mix"]
        assert (ours_config.r, ours_config.lora_alpha) == (theirs_config.r, theirs_config.lora_alpha)
        assert sorted(ours_config.target_modules) == sorted(theirs_config.target_modules)

        theirs.set_adapter("mix")
        expected = eval_logits(theirs, ids)
        ours.save_pretrained(tmp_path / "ours", selected_adapters=["mix"])
        loaded = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours" / "mix"))
        assert (eval_logits(loaded, ids) - expected).abs().max() <= TOL
        theirs.save_pretrained(tmp_path / "theirs", selected_adapters=["mix"])
        loaded = lorakit.PeftModel.from_pretrained(make(), str(tmp_path / "theirs" / "mix"))
        assert (eval_logits(loaded, ids) - expected).abs().max() <= TOL
