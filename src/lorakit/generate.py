"""Text generation from a base model plus an optional adapter, streamed to the terminal.

Usage: lorakit generate "Write a haiku about autumn" [--adapter out/adapter] [--temperature 0.7]
       lorakit generate "..." --device cuda            (bf16 base on CUDA unless --dtype says otherwise)
"""

from __future__ import annotations

import torch

from . import devices, prompts


def generate(
    prompt: str,
    model: str | None = None,
    adapter: str | None = None,
    chat: bool = True,
    system: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    device: devices.DeviceName = "auto",
    dtype: devices.DtypeName = "auto",
) -> str:
    """Generate a continuation of a prompt (or an answer to a chat message), streamed as it comes.

    Args:
        prompt: The text, or the user's chat message with --chat (the default).
        model: A local Hugging Face model folder; the embedded SmolLM2-135M-Instruct when omitted.
        adapter: An adapter directory to apply (lorakit or PEFT format).
        chat: Render the prompt with the tokenizer's chat template as a user message.
        system: An optional system message (with --chat).
        max_new_tokens: Most tokens to generate.
        temperature: 0 for greedy decoding; above 0 samples.
        top_p: Nucleus sampling threshold (with temperature > 0).
        seed: Random seed for sampling.
        device: auto (CUDA when present, then MPS, then CPU), cpu, cuda or mps.
        dtype: The base model's dtype: auto is bf16 on CUDA and fp32 elsewhere; the adapter stays fp32.

    Returns:
        The generated text (without the prompt).

    Raises:
        lorakit.devices.DeviceError: an unknown device or dtype, or a device this machine lacks
            (before the model loads).
    """
    from transformers import TextStreamer

    from .hub import load_model_and_tokenizer
    from .peft_model import PeftModel

    target = devices.resolve_device(device)
    torch_dtype = devices.resolve_dtype(dtype, target)
    torch.manual_seed(seed)
    base, tokenizer = load_model_and_tokenizer(model, dtype=torch_dtype)
    net = PeftModel.from_pretrained(base, adapter) if adapter else base
    net.to(target)
    net.eval()
    input_ids = encode_prompt(tokenizer, prompt, chat=chat, system=system).to(target)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # 0 is a valid id
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = net.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                           streamer=streamer,
                           pad_token_id=pad_id, **sampling)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def encode_prompt(tokenizer, prompt: str, chat: bool = True, system: str | None = None) -> torch.Tensor:
    """Token ids (1, T) of a prompt, through the chat template when `chat` and the tokenizer has one."""
    if chat and prompts.has_chat_template(tokenizer):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return torch.tensor([prompts.encode_messages(tokenizer, messages)])
    return torch.tensor([prompts.encode_text(tokenizer, prompt)])


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64, batch_size: int = 16,
                   adapter_names: list[str] | None = None) -> list[str]:
    """Greedy completions of many tokenized prompts, in left-padded batches.

    Args:
        model: A transformers model or PeftModel (the prompts go to the device of its parameters).
        tokenizer: Its tokenizer (for the pad/EOS ids and decoding).
        prompts: Token ids of each prompt (e.g. from `lorakit.prompts.encode_prompt`).
        max_new_tokens: Most tokens generated per prompt.
        batch_size: Prompts per generate call.
        adapter_names: Per-prompt adapter names for a PeftModel (mixed-adapter batches).

    Returns:
        The decoded completions (prompt excluded, special tokens skipped), in input order.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T), padded on the left
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(chunk):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        extra = {"adapter_names": adapter_names[start:start + batch_size]} if adapter_names else {}
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id, **extra)
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts
