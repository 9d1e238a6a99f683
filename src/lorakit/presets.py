"""Built-in model presets: the `config.json` values of a few popular causal LMs, so that
`lorakit memory Llama-2-7B` works offline. Only shapes are stored, never weights.

Each entry is the subset of the Hugging Face `config.json` that decides the parameter count
and the activation sizes; `preset_config(name)` turns it into a `transformers` config.
"""

from __future__ import annotations

from typing import Any

# name -> (Hugging Face repo the values come from, config.json values)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "Llama-2-7B": ("meta-llama/Llama-2-7b-hf", dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "Mistral-7B": ("mistralai/Mistral-7B-v0.1", dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False)),
    "Llama-3-8B": ("meta-llama/Meta-Llama-3-8B", dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)),
    "Qwen2.5-7B": ("Qwen/Qwen2.5-7B", dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)),
    "SmolLM2-135M": ("HuggingFaceTB/SmolLM2-135M", dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)),
}


def find_preset(name: str) -> str | None:
    """The preset key matching `name` (case-insensitive; the Hugging Face repo id works too)."""
    wanted = name.strip().lower()
    for key, (repo, _) in PRESETS.items():
        if wanted in (key.lower(), repo.lower()):
            return key
    return None


def preset_config(name: str):
    """A `transformers` config (`PretrainedConfig`) for preset `name`.

    Raises:
        KeyError: no preset of that name.
    """
    from transformers import AutoConfig

    key = find_preset(name)
    if key is None:
        raise KeyError(name)
    repo, values = PRESETS[key]
    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config.name_or_path = repo
    return config
