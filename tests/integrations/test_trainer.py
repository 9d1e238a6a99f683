"""A lorakit model under real transformers `Trainer` and TRL `SFTTrainer` runs (CPU, tiny Mistral)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainerCallback
from transformers import Trainer as HFTrainer
from transformers import TrainingArguments

import lorakit
from lorakit.integrations import Trainer

datasets = pytest.importorskip("datasets")

TEXTS = ["the cat sat on the mat", "a dog ran fast in the park", "one two three four five", "red blue green"]


def lora_model(model_dir, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=dropout, task_type="CAUSAL_LM"))


def text_dataset(tokenizer, n: int = 16):
    ds = datasets.Dataset.from_dict({"text": [TEXTS[i % len(TEXTS)] for i in range(n)]})
    return ds.map(lambda rows: tokenizer(rows["text"]), batched=True)  # keeps the "text" column, as users' do


def args(out, **kw) -> TrainingArguments:
    defaults = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                    report_to="none", save_strategy="no", seed=0)
    return TrainingArguments(**{**defaults, **kw})


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lorakit.get_peft_model_state_dict(model).items()}


@pytest.fixture(scope="module")
def tokenizer(tiny_mistral_dir):
    tok = AutoTokenizer.from_pretrained(tiny_mistral_dir)
    tok.pad_token = tok.eos_token
    return tok


def test_plain_trainer_with_default_arguments_trains(tiny_mistral_dir, tokenizer, tmp_path):
    """Default TrainingArguments (remove_unused_columns=True): the columns the model's forward takes
    are kept because the wrapper advertises the base's signature."""
    model = lora_model(tiny_mistral_dir)
    before = lora_tensors(model)
    trainer = HFTrainer(model=model, args=args(tmp_path), train_dataset=text_dataset(tokenizer),
                        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = lora_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_checkpoints_and_save_model_hold_an_adapter_that_peft_loads(tiny_mistral_dir, tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    model = lora_model(tiny_mistral_dir)
    trainer = Trainer(model=model, args=args(tmp_path, save_strategy="steps", save_steps=2),
                      train_dataset=text_dataset(tokenizer), processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path / "final"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names, folder
        assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, folder
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {p.name for p in (tmp_path / "checkpoint-4").iterdir()}
    ids = torch.tensor([tokenizer("the cat ran")["input_ids"]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_mistral_dir), str(tmp_path / "final"))
        torch.testing.assert_close(theirs.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


class StopAt(TrainerCallback):
    """Stop a run after `step` (its checkpoint saved): a run interrupted there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def test_resume_from_checkpoint_ends_at_the_uninterrupted_adapter(tiny_mistral_dir, tokenizer, tmp_path):
    data = text_dataset(tokenizer)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=2)

    whole = lora_model(tiny_mistral_dir)
    Trainer(model=whole, args=args(tmp_path / "whole", **settings), train_dataset=data, data_collator=collator).train()

    first = lora_model(tiny_mistral_dir)
    Trainer(model=first, args=args(tmp_path / "parts", **settings), train_dataset=data, data_collator=collator,
            callbacks=[StopAt(3)]).train()
    assert (tmp_path / "parts" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    resumed = lora_model(tiny_mistral_dir, seed=123)  # a different init: the checkpoint must overwrite it
    Trainer(model=resumed, args=args(tmp_path / "parts", **settings), train_dataset=data,
            data_collator=collator).train(resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-3"))
    expected, got = lora_tensors(whole), lora_tensors(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    final = load_file(tmp_path / "parts" / "checkpoint-6" / "adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-5, atol=1e-5)


def test_load_best_model_at_end_reads_the_adapter_back(tiny_mistral_dir, tokenizer, tmp_path):
    data = text_dataset(tokenizer, n=8)
    model = lora_model(tiny_mistral_dir)
    trainer = Trainer(model=model, args=args(tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                                             save_steps=2, load_best_model_at_end=True),
                      train_dataset=data, eval_dataset=data, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    best = load_file(f"{trainer.state.best_model_checkpoint}/adapter_model.safetensors")
    now = lora_tensors(model)
    assert all(torch.equal(best[k], now[k]) for k in best)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


def test_label_smoothing_gives_peft_s_loss(tiny_mistral_dir, tokenizer, tmp_path):
    """With label smoothing Trainer shifts a causal LM's labels; the same loss as PEFT's model (lr 0)."""
    peft = pytest.importorskip("peft")
    import transformers

    losses = {}
    for lib, trainer_class in ((peft, transformers.Trainer), (lorakit, Trainer)):
        torch.manual_seed(0)
        model = lib.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_mistral_dir),
                                   lib.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        run = trainer_class(model=model, args=args(tmp_path / lib.__name__, max_steps=1, learning_rate=0.0,
                                                   label_smoothing_factor=0.1),
                            train_dataset=text_dataset(tokenizer), data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        losses[lib.__name__] = run.train().training_loss
    assert losses["lorakit"] == pytest.approx(losses["peft"], rel=1e-6)


def test_mixed_precision_keeps_the_columns_for_the_next_trainer(tiny_mistral_dir, tokenizer, tmp_path):
    """accelerate rebinds forward for autocast; the rebound method still shows the model's arguments."""
    import inspect

    model = lora_model(tiny_mistral_dir)
    for run in ("first", "second"):
        Trainer(model=model, args=args(tmp_path / run, bf16=True, use_cpu=True, max_steps=1),
                train_dataset=text_dataset(tokenizer), data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
        assert {"input_ids", "attention_mask", "position_ids"} <= set(inspect.signature(model.forward).parameters)


def test_peft_qlora_recipe_with_a_bitsandbytes_base_trains_under_trainer(tiny_mistral_dir, tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    base = lorakit.prepare_model_for_kbit_training(base)
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    before = lora_tensors(model)
    Trainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=text_dataset(tokenizer),
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
    after = lora_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


# --- TRL -------------------------------------------------------------------------------------------

trl = pytest.importorskip("trl")

ROWS = {
    "text": {"text": TEXTS * 2},
    "messages": {"messages": [[{"role": "user", "content": "name a color"}, {"role": "assistant", "content": t}]
                              for t in TEXTS * 2]},
    "prompt-completion": {"prompt": ["say: " + t for t in TEXTS * 2], "completion": [t for t in TEXTS * 2]},
}


@pytest.mark.parametrize("shape", sorted(ROWS))
def test_sft_trainer_trains_each_row_shape_and_saves_an_adapter_peft_loads(tiny_mistral_dir, tokenizer, tmp_path, shape):
    peft = pytest.importorskip("peft")
    from lorakit.integrations import SFTTrainer

    model = lora_model(tiny_mistral_dir)
    before = lora_tensors(model)
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                           report_to="none", save_strategy="no", logging_steps=1, max_length=64, bf16=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_dict(ROWS[shape]),
                         processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = lora_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    trainer.save_model(str(tmp_path / "final"))
    ids = torch.tensor([tokenizer("the cat ran")["input_ids"]])
    model.eval()
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_mistral_dir), str(tmp_path / "final"))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_sft_trainer_takes_a_lorakit_config_and_a_model_path(tiny_mistral_dir, tokenizer, tmp_path):
    from lorakit.integrations import SFTTrainer

    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none",
                           save_strategy="no", max_length=64, bf16=False)
    trainer = SFTTrainer(model=str(tiny_mistral_dir), args=config, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_dict(ROWS["text"]),
                         peft_config=lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert isinstance(trainer.model, lorakit.PeftModel)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert lorakit.PeftConfig.from_pretrained(tmp_path / "final").r == 4
