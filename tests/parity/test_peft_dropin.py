"""PEFT users' code with only the import changed: the LoRA lesson script, a second get_peft_model on
the same base, and what it prints, checked live against PEFT 0.21."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from conftest import eval_logits, perturb_trainables

LESSON = Path(__file__).with_name("peft_lesson.py")
SHARED_LESSON = Path(__file__).resolve().parents[3] / "shared" / "examples" / "peft_lesson.py"


def run_lesson(script: Path, model_dir: Path, cwd: Path) -> str:
    result = subprocess.run([sys.executable, str(script), str(model_dir)], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_lesson_script_is_the_one_users_run():
    if not SHARED_LESSON.is_file():
        pytest.skip("../shared/examples/peft_lesson.py is not beside this checkout")
    assert LESSON.read_text() == SHARED_LESSON.read_text()


def test_lesson_script_prints_what_it_prints_with_peft(tiny_mistral_dir, tmp_path):
    """The script unchanged but for the import: the same lines as PEFT's run, line for line."""
    ours_dir, theirs_dir = tmp_path / "lorakit", tmp_path / "peft"
    ours_dir.mkdir(), theirs_dir.mkdir()
    peft_script = tmp_path / "peft_lesson_peft.py"
    peft_script.write_text(LESSON.read_text().replace("from lorakit import", "from peft import"))
    ours = run_lesson(LESSON, tiny_mistral_dir, ours_dir)
    theirs = run_lesson(peft_script, tiny_mistral_dir, theirs_dir)
    assert ours == theirs
    lines = ours.splitlines()
    # 2 layers x (q: 64x8 + 8x64, v: 64x8 + 8x32) at r=8
    assert lines[0].startswith("trainable params: 3,584 || all params: ")
    trainable = [line for line in lines if line.startswith("TRAINABLE: ")]
    assert len(trainable) == 8 and all("lora_" in line for line in trainable)
    assert trainable[0].startswith("TRAINABLE: base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert lines[-4:] == ["r=4: 1,792 trainable parameters", "r=8: 3,584 trainable parameters",
                          "r=16: 7,168 trainable parameters", "r=32: 14,336 trainable parameters"]
    assert sorted(p.name for p in (ours_dir / "mistral-lora-adapter").iterdir()) == \
        sorted(p.name for p in (theirs_dir / "mistral-lora-adapter").iterdir()) == \
        ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    ours_config, theirs_config = (json.loads((d / "mistral-lora-adapter" / "adapter_config.json").read_text())
                                  for d in (ours_dir, theirs_dir))
    for key in ("base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "bias", "task_type", "peft_type"):
        assert ours_config[key] == theirs_config[key], key
    assert ours_config["base_model_name_or_path"] == str(tiny_mistral_dir)  # as the script gave it
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])
    ours_mode, theirs_mode = ((d / "mistral-lora-adapter" / "adapter_config.json").stat().st_mode & 0o777
                              for d in (ours_dir, theirs_dir))
    assert ours_mode == theirs_mode


def fp16_base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float16, device_map="auto")


LESSON_CONFIG = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, bias="none",
                     task_type=lorakit.TaskType.CAUSAL_LM)


def test_lesson_steps_reload_reproduces_outputs_and_every_sweep_model_trains(tiny_mistral_dir, tmp_path):
    """The lesson's steps on its fp16, device_map="auto" base: a trained adapter saved and reloaded
    gives the same outputs, and each sweep model on the base that holds it trains at its own rank."""
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    model = lorakit.get_peft_model(fp16_base(tiny_mistral_dir), lorakit.LoraConfig(**LESSON_CONFIG))
    perturb_trainables(model)  # a stand-in for training: B = 0 would make any reload look right
    expected = eval_logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    base_model = fp16_base(tiny_mistral_dir)
    reloaded = lorakit.PeftModel.from_pretrained(base_model, str(tmp_path / "adapter"))
    assert type(reloaded).__name__ == "PeftModelForCausalLM"
    assert (eval_logits(reloaded, ids).float() - expected.float()).abs().max() == 0

    for rank in [4, 8, 16, 32]:
        with pytest.warns(UserWarning, match="for a second time"):
            m = lorakit.get_peft_model(base_model, lorakit.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                      target_modules=["q_proj", "v_proj"],
                                                                      task_type=lorakit.TaskType.CAUSAL_LM))
        trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
        assert sum(p.numel() for p in trainable.values()) == 2 * (64 * rank + rank * 64 + 64 * rank + rank * 32)
        assert all(p.shape[0] == rank for n, p in trainable.items() if ".lora_A." in n)
        m.train()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = [p.grad for n, p in trainable.items() if ".lora_B." in n]
        assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)
        # one registry for every wrapper over the base: the earlier model sees the adapter its layers run
        assert reloaded.peft_config is m.peft_config and m.peft_config["default"].r == rank
        m.zero_grad()


def collect_warnings(fn) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("second_name", ["default", "other"])
def test_second_get_peft_model_warns_and_counts_as_peft(tiny_mistral_dir, tmp_path, second_name):
    """Live against PEFT: a base already holding a loaded adapter, wrapped again (same targets)."""
    lorakit.get_peft_model(fp16_base(tiny_mistral_dir), lorakit.LoraConfig(**LESSON_CONFIG)).save_pretrained(tmp_path)
    results = {}
    for lib in (peft, lorakit):
        base = fp16_base(tiny_mistral_dir)
        first = lib.PeftModel.from_pretrained(base, str(tmp_path))
        config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        second, caught = collect_warnings(lambda: lib.get_peft_model(base, config, adapter_name=second_name))
        results[lib.__name__] = dict(
            warnings=caught, counts=second.get_nb_trainable_parameters(), first_counts=first.get_nb_trainable_parameters(),
            names=sorted(n for n, p in second.named_parameters() if p.requires_grad), adapters=sorted(second.peft_config))
    ours, theirs = results["lorakit"], results["peft"]
    peft_own = [w for w in theirs["warnings"] if "deprecated" not in w]  # transformers' deprecations aside
    assert [w for w in ours["warnings"] if "deprecated" not in w] == peft_own
    assert any("for a second time" in w for w in ours["warnings"])
    for key in ("counts", "first_counts", "names", "adapters"):
        assert ours[key] == theirs[key], key


def test_a_sweep_over_other_targets_leaves_no_half_of_the_old_adapter(tiny_mistral_dir, tmp_path):
    """Where PEFT keeps the old adapter's v_proj factors (and trains them) when the new config
    targets q_proj only, lorakit replaces the adapter whole: q_proj at the new rank, nothing else."""
    base = fp16_base(tiny_mistral_dir)
    lorakit.get_peft_model(base, lorakit.LoraConfig(**LESSON_CONFIG))
    with pytest.warns(UserWarning, match="for a second time"):
        m = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    names = [n for n, _ in m.named_parameters() if ".lora_" in n]
    assert names and all(".q_proj." in n for n in names)
    assert m.get_nb_trainable_parameters()[0] == 2 * (64 * 4 + 4 * 64)
    assert not any(re.search(r"v_proj\.lora_", n) for n, _ in base.named_parameters())


def test_peft_qlora_recipe_with_bitsandbytes_trains_and_refuses_to_merge_by_name(tiny_mistral_dir, ids_long):
    """PEFT's QLoRA recipe as written: a base loaded 4-bit by bitsandbytes, prepare_model_for_kbit_training,
    get_peft_model. Same trainable parameters and checkpointing as PEFT; the adapter trains; merging
    into bitsandbytes' packed weights is refused with a named error (PEFT dequantizes), nothing merged."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    models = {}
    for lib in (peft, lorakit):
        quantized = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
        quantized = lib.prepare_model_for_kbit_training(quantized)
        models[lib.__name__] = lib.get_peft_model(quantized, lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ours, theirs = models["lorakit"], models["peft"]
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]
    assert ours.get_base_model().is_gradient_checkpointing and theirs.get_base_model().is_gradient_checkpointing
    ours.train()
    ours(input_ids=ids_long, labels=ids_long).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ours.named_parameters() if ".lora_B." in n)
    ours.eval()
    with torch.no_grad():
        before = ours(input_ids=ids_long).logits
    with pytest.raises(lorakit.quant.QuantizedMergeError, match="bitsandbytes.*nothing was merged"):
        ours.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids_long).logits, before)


@pytest.fixture
def ids_long():
    return torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(3))


def test_adding_and_switching_adapters_keep_hand_set_flags_as_peft():
    from conftest import tiny_llama

    flags = {}
    for lib in (peft, lorakit):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=2, target_modules=["q_proj"]))
        model.base_model.model.model.norm.weight.requires_grad_(True)  # unfrozen by hand
        model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["v_proj"]))
        after_add = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        model.set_adapter("b")
        flags[lib.__name__] = (after_add, sorted(n for n, p in model.named_parameters() if p.requires_grad))
    assert flags["lorakit"] == flags["peft"]
    assert "base_model.model.model.norm.weight" in flags["lorakit"][1]
