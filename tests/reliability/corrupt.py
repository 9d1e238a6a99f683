"""Corrupted variants of one valid saved adapter folder, for the fault-injection tests.

    root = tmp_path / "variants"
    for variant, folder in write_variants(root):   # each variant a folder under root, named variant.name
        ...                                       # load it; variant.loads says whether it should

The valid folder is a rank-4 adapter on q_proj and v_proj of `conftest.tiny_llama()` (hidden 32,
2 layers; also the shape of the server tests' base). Each variant changes one thing, in one of
four groups: "file" (what is on disk: missing, empty, truncated, garbage, a folder or a symlink
loop in a file's place, no permission), "header" (the safetensors header: its length, its JSON,
its offsets, its dtype strings), "tensors" (shapes, ranks, values, dtypes, keys) and "config"
(adapter_config.json: JSON, types, ranges, regexes, nesting, peft_type, PiSSA/OLoRA with broken
weights, targets the model lacks, another base model). A few variants are valid and must load
(`loads=True`); `match` is a fragment the refusal must name, case-insensitive.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, get_peft_model

from conftest import perturb_trainables, tiny_llama

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers."
Q_A = PREFIX + "0.self_attn.q_proj.lora_A.weight"  # (4, 32)
Q_B = PREFIX + "0.self_attn.q_proj.lora_B.weight"  # (32, 4)
V_B = PREFIX + "1.self_attn.v_proj.lora_B.weight"  # (16, 4)
ROOT = os.geteuid() == 0  # permissions do not stop root


@dataclass(frozen=True)
class Variant:
    """One corrupted (or, with `loads`, still valid) adapter folder.

    Attributes:
        name: The folder's name (unique).
        group: "file", "header", "tensors" or "config".
        edit: Changes a copy of the valid folder in place.
        match: A fragment the error must contain (case-insensitive); None for `loads`.
        loads: The variant is a valid adapter and must load.
    """

    name: str
    group: str
    edit: Callable[[Path], None]
    match: str | None = None
    loads: bool = False


def write_valid(folder: Path, seed: int = 3, **config) -> Path:
    """Save the valid adapter (rank 4 on q_proj, v_proj; trained-looking weights) to `folder`."""
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) | config
    model = get_peft_model(tiny_llama(), LoraConfig(**settings))
    perturb_trainables(model, seed=seed)
    model.save_pretrained(str(folder))
    return folder


# --- edits ----------------------------------------------------------------------------------------

def config_edit(**changes) -> Callable[[Path], None]:
    """Set (or, with the value `DROP`, remove) top-level config fields."""
    def edit(folder: Path) -> None:
        data = json.loads((folder / CONFIG).read_text())
        for key, value in changes.items():
            if value is DROP:
                data.pop(key, None)
            else:
                data[key] = value
        (folder / CONFIG).write_text(json.dumps(data))
    return edit


DROP = object()


def config_text(text: str | bytes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / CONFIG).write_bytes(text.encode() if isinstance(text, str) else text)
    return edit


def tensors_edit(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    """Rewrite the weights file after `change(tensors)` (a dict, changed in place)."""
    def edit(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS)
        change(tensors)
        save_file({k: t.contiguous() for k, t in tensors.items()}, folder / WEIGHTS, metadata={"format": "pt"})
    return edit


def set_tensor(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    return tensors_edit(lambda t: t.__setitem__(key, make(t[key])))


def nonfinite(key: str, value: float) -> Callable[[Path], None]:
    def make(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[1] = value
        return t
    return set_tensor(key, make)


def header_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite the safetensors header's JSON (data bytes unchanged)."""
    def edit(folder: Path) -> None:
        raw = (folder / WEIGHTS).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        change(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return edit


def header_bytes(make: Callable[[bytes, int], bytes]) -> Callable[[Path], None]:
    """Replace the weights file by `make(raw, header_length)`."""
    def edit(folder: Path) -> None:
        raw = (folder / WEIGHTS).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        (folder / WEIGHTS).write_bytes(make(raw, n))
    return edit


def first_tensor(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def file_edits(name: str) -> list[tuple[str, Callable[[Path], None], str]]:
    """The on-disk corruptions of one file: (label, edit, match)."""
    def replace_with(make: Callable[[Path], None]) -> Callable[[Path], None]:
        def edit(folder: Path) -> None:
            (folder / name).unlink()
            make(folder / name)
        return edit

    def no_permission(folder: Path) -> None:
        (folder / name).chmod(0)

    def symlink_loop(path: Path) -> None:
        path.symlink_to(path.name)

    kind = "json" if name == CONFIG else "safetensors"
    edits = [
        ("missing", lambda f: (f / name).unlink(), "missing" if name == CONFIG else "no adapter_model"),
        ("empty", lambda f: (f / name).write_bytes(b""), kind),
        ("truncated-half", lambda f: (f / name).write_bytes((f / name).read_bytes()[:len((f / name).read_bytes()) // 2]),
         kind),
        ("truncated-7-bytes", lambda f: (f / name).write_bytes((f / name).read_bytes()[:7]), kind),
        ("garbage", lambda f: (f / name).write_bytes(bytes(range(256)) * 8), kind),
        ("nul-bytes", lambda f: (f / name).write_bytes(b"\0" * 4096), kind),
        ("directory", replace_with(lambda p: p.mkdir()), "missing" if name == CONFIG else "no adapter_model"),
        ("symlink-loop", replace_with(symlink_loop), "missing" if name == CONFIG else "no adapter_model"),
        ("dangling-symlink", replace_with(lambda p: p.symlink_to("nowhere")),
         "missing" if name == CONFIG else "no adapter_model"),
    ]
    if not ROOT:
        edits.append(("no-permission", no_permission, "permission"))
    return edits


# --- the variants ---------------------------------------------------------------------------------

def _file_variants() -> list[Variant]:
    variants = []
    for file, short in ((CONFIG, "config"), (WEIGHTS, "weights")):
        variants += [Variant(f"file-{short}-{label}", "file", edit, match) for label, edit, match in file_edits(file)]

    def folder_is_file(folder: Path) -> None:
        shutil.rmtree(folder)
        folder.write_text("not a folder")

    def folder_symlink_loop(folder: Path) -> None:
        shutil.rmtree(folder)
        folder.symlink_to(folder.name)

    def pickle_only(folder: Path) -> None:
        torch.save(load_file(folder / WEIGHTS), folder / "adapter_model.bin")
        (folder / WEIGHTS).unlink()

    def weights_swapped_for_config(folder: Path) -> None:
        config, weights = (folder / CONFIG).read_bytes(), (folder / WEIGHTS).read_bytes()
        (folder / CONFIG).write_bytes(weights)
        (folder / WEIGHTS).write_bytes(config)

    variants += [
        Variant("file-folder-is-a-file", "file", folder_is_file, "does not exist"),
        Variant("file-folder-symlink-loop", "file", folder_symlink_loop, "does not exist"),
        Variant("file-folder-empty", "file", lambda f: [p.unlink() for p in list(f.iterdir())], "missing"),
        Variant("file-pickle-weights-only", "file", pickle_only, "allow_pickle"),
        Variant("file-config-and-weights-swapped", "file", weights_swapped_for_config, "json"),
        Variant("file-readme-missing", "file", lambda f: (f / "README.md").unlink(), loads=True),
        Variant("file-readme-garbage", "file", lambda f: (f / "README.md").write_bytes(b"\xff\xfe\0" * 100), loads=True),
        Variant("file-extra-files", "file", lambda f: (f / "notes.txt").write_text("mine"), loads=True),
    ]
    return variants


def _header_variants() -> list[Variant]:
    huge = 2 ** 63
    return [Variant("header-" + name, "header", edit, match) for name, edit, match in [
        ("length-past-end", header_bytes(lambda raw, n: struct.pack("<Q", len(raw)) + raw[8:]), "safetensors"),
        ("length-zero", header_bytes(lambda raw, n: struct.pack("<Q", 0) + raw[8:]), "safetensors"),
        ("length-huge", header_bytes(lambda raw, n: struct.pack("<Q", huge) + raw[8:]), "safetensors"),
        ("length-over-100mb", header_bytes(lambda raw, n: struct.pack("<Q", 200 * 2 ** 20) + raw[8:]), "safetensors"),
        ("length-one-short", header_bytes(lambda raw, n: struct.pack("<Q", n - 1) + raw[8:]), "safetensors"),
        ("json-broken", header_bytes(lambda raw, n: raw[:8] + b"{" * n + raw[8 + n:]), "safetensors"),
        ("json-a-list", header_bytes(lambda raw, n: raw[:8] + b"[]".ljust(n) + raw[8 + n:]), "safetensors"),
        ("json-not-utf8", header_bytes(lambda raw, n: raw[:8] + b"\xff" * n + raw[8 + n:]), "safetensors"),
        ("json-deeply-nested", header_bytes(lambda raw, n: struct.pack("<Q", 200000) + b"[" * 100000 + b"]" * 100000),
         "safetensors"),
        ("offsets-overlapping", header_edit(lambda h: [t.__setitem__("data_offsets", [0, t["data_offsets"][1] -
                                                                                     t["data_offsets"][0]])
                                                       for k, t in h.items() if k != "__metadata__"]), "safetensors"),
        ("offsets-past-end", header_edit(lambda h: first_tensor(h).__setitem__(
            "data_offsets", [first_tensor(h)["data_offsets"][0], 10 ** 9])), "safetensors"),
        ("offsets-reversed", header_edit(lambda h: first_tensor(h).__setitem__(
            "data_offsets", first_tensor(h)["data_offsets"][::-1])), "safetensors"),
        ("offsets-negative", header_edit(lambda h: first_tensor(h).__setitem__("data_offsets", [-8, 0])), "safetensors"),
        ("offsets-missing", header_edit(lambda h: first_tensor(h).pop("data_offsets")), "safetensors"),
        ("shape-disagrees-with-offsets", header_edit(lambda h: first_tensor(h).__setitem__("shape", [4, 33])),
         "safetensors"),
        ("shape-negative", header_edit(lambda h: first_tensor(h).__setitem__("shape", [-4, -32])), "safetensors"),
        ("dtype-unknown", header_edit(lambda h: first_tensor(h).__setitem__("dtype", "F99")), "safetensors"),
        ("dtype-not-a-string", header_edit(lambda h: first_tensor(h).__setitem__("dtype", 7)), "safetensors"),
        ("dtype-i32-same-size", header_edit(lambda h: [t.__setitem__("dtype", "I32") for k, t in h.items()
                                                      if k != "__metadata__"]), "floating point"),
        ("dtype-bool-misread", header_edit(lambda h: first_tensor(h).__setitem__("dtype", "BOOL")), "safetensors"),
        ("metadata-not-strings", header_edit(lambda h: h.__setitem__("__metadata__", {"format": 5})), "safetensors"),
    ]]


def _tensor_variants() -> list[Variant]:
    other_base = {}

    def from_another_base(folder: Path) -> None:
        if "tensors" not in other_base:
            torch.manual_seed(0)
            model = get_peft_model(tiny_llama(hidden_size=48), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
            other_base["tensors"] = {f"base_model.model.{k}".replace(".default", ""): v.detach().clone()
                                     for k, v in model.get_base_model().state_dict().items() if "lora_" in k}
        save_file(other_base["tensors"], folder / WEIGHTS)

    def rename_keys(old: str, new: str) -> Callable[[dict], None]:
        return lambda t: t.update({k.replace(old, new): t.pop(k) for k in list(t)})

    return [Variant("tensors-" + name, "tensors", edit, match, loads) for name, edit, match, loads in [
        ("shape-transposed", set_tensor(Q_A, lambda t: t.T), "shape mismatch", False),
        ("shape-rank-8", set_tensor(Q_A, lambda t: torch.cat([t, t])), "shape mismatch", False),
        ("shape-in-features-wrong", set_tensor(Q_A, lambda t: t[:, :31]), "shape mismatch", False),
        ("rank-1d", set_tensor(Q_A, lambda t: t.flatten()), "shape mismatch", False),
        ("rank-3d", set_tensor(Q_A, lambda t: t[None]), "shape mismatch", False),
        ("rank-0d", set_tensor(Q_B, lambda t: t[0, 0]), "shape mismatch", False),
        ("empty-tensor", set_tensor(Q_A, lambda t: t[:0]), "shape mismatch", False),
        ("nan", nonfinite(Q_B, float("nan")), "nan", False),
        ("inf", nonfinite(Q_A, float("inf")), "inf", False),
        ("minus-inf", nonfinite(V_B, float("-inf")), "inf", False),
        ("nan-in-bf16", tensors_edit(lambda t: t.update({Q_B: t[Q_B].bfloat16().index_fill(0, torch.tensor([0]),
                                                                                            float("nan"))})),
         "nan", False),
        ("dtype-int64", set_tensor(Q_A, lambda t: t.long()), "floating point", False),
        ("dtype-int32", set_tensor(Q_A, lambda t: t.int()), "floating point", False),
        ("dtype-uint8", set_tensor(Q_A, lambda t: t.to(torch.uint8)), "floating point", False),
        ("dtype-int8", set_tensor(Q_B, lambda t: t.to(torch.int8)), "floating point", False),
        ("dtype-bool", set_tensor(Q_A, lambda t: t > 0), "floating point", False),
        ("dtype-complex64", set_tensor(Q_A, lambda t: t.to(torch.complex64)), "safetensors|floating point", False),
        ("dtype-float8", set_tensor(Q_A, lambda t: t.to(torch.float8_e4m3fn)), "floating point", False),
        ("dtype-float16", set_tensor(Q_A, lambda t: t.half()), None, True),
        ("dtype-bfloat16", tensors_edit(lambda t: t.update({k: v.bfloat16() for k, v in t.items()})), None, True),
        ("dtype-float64", set_tensor(Q_B, lambda t: t.double()), None, True),
        ("huge-but-finite", set_tensor(Q_B, lambda t: t * 1e30), None, True),
        ("missing-lora-a", tensors_edit(lambda t: t.pop(Q_A)), "missing keys", False),
        ("missing-lora-b", tensors_edit(lambda t: t.pop(V_B)), "missing keys", False),
        ("no-tensors", tensors_edit(lambda t: t.clear()), "missing keys", False),
        ("extra-key-other-module", tensors_edit(lambda t: t.update(
            {PREFIX + "0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 32)})), "unexpected keys", False),
        ("extra-key-unrelated", tensors_edit(lambda t: t.update({"base_model.model.foo": torch.zeros(1)})),
         "unexpected keys", False),
        ("extra-key-layer-out-of-range", tensors_edit(lambda t: t.update(
            {PREFIX + "9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)})), "unexpected keys", False),
        ("extra-key-base-weight", tensors_edit(lambda t: t.update(
            {PREFIX + "0.self_attn.q_proj.base_layer.weight": torch.zeros(32, 32)})), "unexpected keys", False),
        ("prefix-missing", tensors_edit(rename_keys("base_model.model.", "")), "prefix", False),
        ("prefix-doubled", tensors_edit(rename_keys("base_model.model.", "base_model.model.base_model.model.")),
         "unexpected keys", False),
        ("adapter-name-in-keys", tensors_edit(rename_keys(".weight", ".default.weight")), "keys", False),
        ("from-another-base-model", from_another_base, "shape mismatch", False),
    ]]


def _pissa_broken(init: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config_edit(init_lora_weights=init)(folder)
        tensors_edit(change)(folder)
    return edit


def _config_variants() -> list[Variant]:
    nested = "[" * 100000 + "]" * 100000
    cases = [
        ("json-broken", config_text("{not json"), "json", False),
        ("json-a-list", config_text("[1, 2]"), "object|mapping|dict|json", False),
        ("json-a-string", config_text('"LORA"'), "object|mapping|dict|json", False),
        ("json-null", config_text("null"), "object|mapping|dict|json", False),
        ("json-not-utf8", config_text(b'{"r": "\xff\xfe"}'), "json|utf", False),
        ("json-deeply-nested", config_text('{"r": 4, "target_modules": ' + nested + "}"), "nested", False),
        ("json-deep-field", config_text('{"peft_type": "LORA", "r": 4, "x": ' + nested + "}"), "nested", False),
        ("json-duplicate-keys-last-wins", lambda f: (f / CONFIG).write_text(
            (f / CONFIG).read_text().replace('{', '{"r": 99, ', 1)), None, True),
        ("json-huge-whitespace", lambda f: (f / CONFIG).write_text((f / CONFIG).read_text() + " " * 2_000_000),
         None, True),
        ("r-string", config_edit(r="4"), "r must be an integer", False),
        ("r-zero", config_edit(r=0), "r must be an integer", False),
        ("r-negative", config_edit(r=-4), "r must be an integer", False),
        ("r-float", config_edit(r=4.5), "r must be an integer", False),
        ("r-bool", config_edit(r=True), "r must be an integer", False),
        ("r-huge", config_edit(r=10 ** 30), "r must be an integer", False),
        ("r-null", config_edit(r=None), "r must be an integer", False),
        ("r-wrong-value", config_edit(r=8), "shape mismatch", False),
        ("alpha-infinity", config_text('{"peft_type": "LORA", "r": 4, "lora_alpha": Infinity, '
                                       '"target_modules": ["q_proj", "v_proj"]}'), "lora_alpha", False),
        ("alpha-nan", config_text('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN, '
                                  '"target_modules": ["q_proj", "v_proj"]}'), "lora_alpha", False),
        ("alpha-1e308", config_edit(lora_alpha=1e308), "lora_alpha", False),
        ("alpha-negative", config_edit(lora_alpha=-8), "lora_alpha", False),
        ("alpha-zero", config_edit(lora_alpha=0), "lora_alpha", False),
        ("alpha-string", config_edit(lora_alpha="8"), "lora_alpha", False),
        ("alpha-float", config_edit(lora_alpha=12.5), None, True),
        ("rslora-string", config_edit(use_rslora="no"), "use_rslora", False),
        ("dora-string", config_edit(use_dora="yes"), "use_dora", False),
        ("dora-int", config_edit(use_dora=1), "use_dora", False),
        ("fan-in-fan-out-on-linear", config_edit(fan_in_fan_out=True), None, True),  # corrected, with a warning
        ("dropout-above-one", config_edit(lora_dropout=2.0), "lora_dropout", False),
        ("dropout-negative", config_edit(lora_dropout=-0.1), "lora_dropout", False),
        ("dropout-string", config_edit(lora_dropout="x"), "lora_dropout", False),
        ("bias-unknown", config_edit(bias="maybe"), "bias", False),
        ("targets-bad-regex", config_edit(target_modules=".*(q_proj"), "target_modules", False),
        ("targets-regex-matching-nothing", config_edit(target_modules=".*\\.nothing_here"), "target", False),
        ("targets-not-in-model", config_edit(target_modules=["foo_proj", "bar_proj"]), "target", False),
        ("targets-an-int", config_edit(target_modules=5), "target_modules", False),
        ("targets-list-of-ints", config_edit(target_modules=[1, 2]), "target_modules", False),
        ("targets-missing", config_edit(target_modules=DROP), None, True),  # PEFT's Llama default: q_proj, v_proj,
        ("targets-subset", config_edit(target_modules=["q_proj"]), "unexpected keys", False),
        ("targets-superset", config_edit(target_modules=["q_proj", "v_proj", "k_proj"]), "missing keys", False),
        ("rank-pattern-bad-regex", config_edit(rank_pattern={"(q_proj": 8}), "rank_pattern", False),
        ("rank-pattern-string-rank", config_edit(rank_pattern={"q_proj": "8"}), "rank_pattern", False),
        ("rank-pattern-a-list", config_edit(rank_pattern=["q_proj"]), "rank_pattern", False),
        ("rank-pattern-changes-shapes", config_edit(rank_pattern={"q_proj": 8}), "shape mismatch", False),
        ("alpha-pattern-infinite", config_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": '
                                               '{"q_proj": Infinity}, "target_modules": ["q_proj", "v_proj"]}'),
         "alpha_pattern", False),
        ("alpha-pattern-bad-regex", config_edit(alpha_pattern={"[": 4}), "alpha_pattern", False),
        ("layers-to-transform-out-of-range", config_edit(layers_to_transform=[99]), "layers_to_transform", False),
        ("layers-to-transform-string", config_edit(layers_to_transform="x"), "layers_to_transform", False),
        ("peft-type-prefix-tuning", config_edit(peft_type="PREFIX_TUNING"), "only 'LORA'", False),
        ("peft-type-unknown", config_edit(peft_type="NOT_A_METHOD"), "LORA", False),
        ("peft-type-an-int", config_edit(peft_type=3), "peft_type", False),
        ("peft-type-missing", config_edit(peft_type=DROP), "peft_type", False),  # PEFT cannot tell the method either,
        ("task-type-unknown", config_edit(task_type="TELEPATHY"), "task_type", False),
        ("init-unknown", config_edit(init_lora_weights="bogus"), "init_lora_weights", False),
        ("init-an-int", config_edit(init_lora_weights=3), "init_lora_weights", False),
        ("pissa-missing-tensor", _pissa_broken("pissa", lambda t: t.pop(Q_A)), "missing keys", False),
        ("pissa-rank-mismatch", _pissa_broken("pissa", lambda t: t.update({Q_A: torch.cat([t[Q_A], t[Q_A]])})),
         "shape mismatch", False),
        ("olora-missing-tensor", _pissa_broken("olora", lambda t: t.pop(V_B)), "missing keys", False),
        ("olora-nan", _pissa_broken("olora", lambda t: t[Q_B].view(-1).__setitem__(0, float("nan"))), "nan", False),
        ("pissa-niter-zero", config_edit(init_lora_weights="pissa_niter_0"), "init_lora_weights", False),
        ("modules-to-save-not-in-model", config_edit(modules_to_save=["no_such_head"]), "modules_to_save", False),
        ("modules-to-save-an-int", config_edit(modules_to_save=5), "modules_to_save", False),
        ("unsupported-feature", config_edit(use_qalora=True), "use_qalora", False),
        ("unknown-field", config_edit(brand_new_option=1), None, True),
        ("other-base-model-name", config_edit(base_model_name_or_path="someone/another-model"), None, True),
        ("inference-mode-string", config_edit(inference_mode="false"), "inference_mode", False),
    ]
    return [Variant("config-" + name, "config", edit, match, loads) for name, edit, match, loads in cases]


def variants() -> list[Variant]:
    """Every variant, in a fixed order (names unique)."""
    found = _file_variants() + _header_variants() + _tensor_variants() + _config_variants()
    assert len({v.name for v in found}) == len(found)
    return found


def write_variants(root: Path) -> list[tuple[Variant, Path]]:
    """Write the valid adapter once, then each variant as a folder `root/<name>`; returns them in order."""
    valid = write_valid(root / ".valid")
    written = []
    for variant in variants():
        folder = root / variant.name
        shutil.copytree(valid, folder)
        variant.edit(folder)
        written.append((variant, folder))
    return written


def restore_permissions(root: Path) -> None:
    """Make every file under `root` readable again (so pytest can remove tmp_path)."""
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
