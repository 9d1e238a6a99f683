"""PEFT's own quick-start examples (the quick tour, training with transformers' Trainer, inference
with AutoPeftModelForCausalLM), run once with `from peft import ...` and once with `from lorakit
import ...` on tiny local models: the same printed counts, the same initial and trained adapters,
the same generations."""

from __future__ import annotations

import runpy

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
pytest.importorskip("datasets")

QUICK_TOUR = '''
from {lib} import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSeq2SeqLM

peft_config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
model = AutoModelForSeq2SeqLM.from_pretrained({model!r})
model = get_peft_model(model, peft_config)
model.print_trainable_parameters()
'''

TRAINER_EXAMPLE = '''
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments
from {lib} import LoraConfig, TaskType, get_peft_model

tokenizer = AutoTokenizer.from_pretrained({model!r})
tokenizer.pad_token = tokenizer.eos_token
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained({model!r})
peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.0)
model = get_peft_model(model, peft_config)
model.print_trainable_parameters()
initial = {{k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}}

texts = ["the cat sat on the mat", "a dog ran fast", "one two three four", "red blue green"] * 4
dataset = Dataset.from_dict({{"text": texts}}).map(lambda rows: tokenizer(rows["text"]), batched=True)
training_args = TrainingArguments(output_dir={out!r}, learning_rate=1e-3, per_device_train_batch_size=4,
                                  num_train_epochs=2, weight_decay=0.01, save_strategy="no", report_to="none", seed=0)
trainer = Trainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
trainer.train()
model.save_pretrained({out!r} + "/adapter")
'''

INFERENCE_EXAMPLE = '''
from transformers import AutoTokenizer
from {lib} import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained({adapter!r})
tokenizer = AutoTokenizer.from_pretrained({model!r})
model.eval()
inputs = tokenizer("the cat sat on", return_tensors="pt")
outputs = model.generate(input_ids=inputs["input_ids"], max_new_tokens=8, do_sample=False)
'''

LIBS = ("peft", "lorakit")


def run(tmp_path, code: str, name: str, capsys) -> tuple[dict, str]:
    script = tmp_path / f"{name}.py"
    script.write_text(code)
    capsys.readouterr()
    result = runpy.run_path(str(script))
    return result, capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory, tiny_mistral_dir):
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral_dir)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0)
    path = tmp_path_factory.mktemp("tiny-t5")
    T5ForConditionalGeneration(config).save_pretrained(path)
    return path


def test_quick_tour_prints_the_same_counts(tmp_path, capsys, tiny_t5_dir):
    out = {lib: run(tmp_path, QUICK_TOUR.format(lib=lib, model=str(tiny_t5_dir)), f"tour_{lib}", capsys) for lib in LIBS}
    assert out["lorakit"][1] == out["peft"][1] and out["lorakit"][1].startswith("trainable params: ")
    ours, theirs = out["lorakit"][0]["model"], out["peft"][0]["model"]
    assert type(ours).__name__ == type(theirs).__name__ == "PeftModelForSeq2SeqLM"
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in theirs.named_parameters() if p.requires_grad]


def test_trainer_example_trains_the_same_adapter_and_inference_generates_the_same(tmp_path, capsys, tiny_mistral_dir):
    runs = {}
    for lib in LIBS:
        out = tmp_path / lib
        runs[lib] = run(tmp_path, TRAINER_EXAMPLE.format(lib=lib, model=str(tiny_mistral_dir), out=str(out)),
                        f"train_{lib}", capsys)
    (ours, ours_out), (theirs, theirs_out) = runs["lorakit"], runs["peft"]
    assert ours_out.splitlines()[0] == theirs_out.splitlines()[0]  # print_trainable_parameters' line
    assert ours["initial"].keys() == theirs["initial"].keys()
    for key in ours["initial"]:
        assert torch.equal(ours["initial"][key], theirs["initial"][key]), key  # same init from the same seed
    ours_file = load_file(tmp_path / "lorakit" / "adapter" / "adapter_model.safetensors")
    theirs_file = load_file(tmp_path / "peft" / "adapter" / "adapter_model.safetensors")
    assert ours_file.keys() == theirs_file.keys()
    for key in ours_file:
        torch.testing.assert_close(ours_file[key], theirs_file[key], rtol=1e-3, atol=1e-4)
    assert any(ours_file[k].abs().sum() > 0 for k in ours_file if "lora_B" in k)  # it trained

    generated = {}
    for lib in LIBS:
        for source in LIBS:  # each library loads each library's adapter
            code = INFERENCE_EXAMPLE.format(lib=lib, adapter=str(tmp_path / source / "adapter"), model=str(tiny_mistral_dir))
            generated[lib, source] = run(tmp_path, code, f"infer_{lib}_{source}", capsys)[0]["outputs"]
    assert type(run(tmp_path, INFERENCE_EXAMPLE.format(lib="lorakit", adapter=str(tmp_path / "peft" / "adapter"),
                                                       model=str(tiny_mistral_dir)), "kind", capsys)[0]["model"]).__name__ \
        == "PeftModelForCausalLM"
    assert torch.equal(generated["lorakit", "lorakit"], generated["peft", "lorakit"])
    assert torch.equal(generated["lorakit", "peft"], generated["peft", "peft"])
