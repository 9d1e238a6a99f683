"""The one place prompts become text and token ids: training, evaluation, generation and serving.

    ids = encode_prompt({"instruction": "Translate", "input": "Bonjour"}, tokenizer)   # a training example's prompt
    ids = encode_messages(tokenizer, [{"role": "user", "content": "hi"}])           # a chat, ready for the reply
    ids = encode_text(tokenizer, "Once upon a time")                                 # raw text
    ids = encode_prompt({"prompt": "The capital of France is"}, tokenizer)           # TRL's prompt/completion

With a chat template, an Alpaca example's prompt is one user turn (instruction, then input) and a
chat example's prompt is its messages before the last assistant turn, both followed by the
template's generation prompt; the template writes its own special tokens. Without one, the plain
"### Instruction / ### Response" template is used and the tokenizer adds its special tokens.
A prompt/completion example (TRL's shape) gives its prompt as is: a string is the prompt text,
encoded with the tokenizer's special tokens (as plain text is); a list of messages is rendered by
the chat template with the generation prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

# Used for Alpaca examples when the tokenizer has no chat template.
PLAIN_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _alpaca_user_text(example: dict) -> str:
    if example.get("input"):
        return f"{example['instruction']}\n\n{example['input']}"
    return example["instruction"]


def require_chat_template(tokenizer) -> None:
    if not has_chat_template(tokenizer):
        raise ValueError("chat examples need a tokenizer with a chat template, and this one has none")


def render_prompt(example: dict, tokenizer) -> str:
    """The prompt text for an example: what the model is given to continue.

    For an Alpaca example: with a chat template, the instruction (and input,
    after a blank line) as one user message, rendered with the generation
    prompt; without one, the plain "### Instruction / ### Input / ### Response"
    template. For a chat example: the messages, less a final assistant
    message (the response to predict), rendered with the generation prompt. For a
    prompt/completion example: a string prompt as it is; a list of prompt messages
    rendered with the generation prompt. Training puts exactly this text before the
    response, so inference must use it too.

    Args:
        example: An Alpaca, chat or prompt/completion example (a dict as read by
            `read_jsonl`, or built in code, e.g. ``{"instruction": ..., "input": ...}``
            or ``{"prompt": ...}``; the output, final assistant message and
            completion are not needed).
        tokenizer: A Hugging Face tokenizer.

    Returns:
        The prompt text.

    Raises:
        ValueError: For a plain-text example (it has no prompt), or a chat (or
            conversational prompt/completion) example with a tokenizer that has no
            chat template.
    """
    if "prompt" in example:
        if isinstance(example["prompt"], str):
            return example["prompt"]
        require_chat_template(tokenizer)
        return tokenizer.apply_chat_template(list(example["prompt"]), tokenize=False, add_generation_prompt=True)
    if "messages" in example:
        require_chat_template(tokenizer)
        messages = example["messages"]
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if "instruction" in example:
        if has_chat_template(tokenizer):
            user = {"role": "user", "content": _alpaca_user_text(example)}
            return tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        if example.get("input"):
            return PLAIN_PROMPT_WITH_INPUT.format(instruction=example["instruction"], input=example["input"])
        return PLAIN_PROMPT_NO_INPUT.format(instruction=example["instruction"])
    raise ValueError("plain-text examples have no prompt: their loss covers every token")


def prompt_adds_special_tokens(tokenizer) -> bool:
    # A chat template writes its own special tokens (BOS included) into the
    # text; the plain template does not, so the tokenizer adds its own.
    return not has_chat_template(tokenizer)


def encode_prompt(example: dict, tokenizer) -> list[int]:
    """The prompt token ids for an example, exactly as training uses them.

    Args:
        example: See `render_prompt`.
        tokenizer: A Hugging Face tokenizer.

    Returns:
        Token ids of `render_prompt(example, tokenizer)`; special tokens (e.g.
        BOS) are added by the tokenizer only for the plain template and for a
        string prompt (which no template renders).
    """
    text = render_prompt(example, tokenizer)
    plain_prompt = isinstance(example.get("prompt"), str)
    add_special = plain_prompt or ("prompt" not in example and prompt_adds_special_tokens(tokenizer))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def encode_messages(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation through the chat template, ending with the generation prompt
    (the template writes its own special tokens, so the tokenizer adds none).

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    require_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of raw text, with the tokenizer's special tokens (e.g. BOS)."""
    return tokenizer(text)["input_ids"]
