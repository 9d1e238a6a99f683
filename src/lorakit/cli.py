"""The `lorakit` command line: each subcommand is a typed Python function.

Usage: lorakit <command> [--flag value ...]      lorakit <command> --help

A command's flags, types, defaults and help text come from its function's signature and its
Google-style docstring (`Args:` section), so the CLI and the Python API cannot drift apart.
Every command also takes `--config FILE.yaml`: its keys (flag names, with - or _) become
the defaults, and flags given on the command line override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

# name -> "module:function"; imported only when that command runs (or for --help).
COMMANDS: dict[str, str] = {
    "demo": "lorakit.demo:demo",
    "train": "lorakit.train.loop:train",
    "sweep": "lorakit.train.sweep:sweep",
    "generate": "lorakit.generate:generate",
    "serve": "lorakit.serve.app:serve",
    "merge": "lorakit.export:merge",
    "memory": "lorakit.memory:memory",
    "inspect": "lorakit.analysis:inspect_adapter",
    "extract": "lorakit.analysis:extract",
    "combine": "lorakit.export:combine",
}


def load_command(name: str) -> Callable[..., Any]:
    module_name, func_name = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module_name), func_name)


# --- signature -> argparse --------------------------------------------------------------------------

def docstring_args(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(summary, {param: help}) from a Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n")[0].replace("\n", " ")
    helps: dict[str, str] = {}
    section = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)*)", doc, re.MULTILINE)
    if section:
        current = None
        for line in section.group(1).splitlines():
            match = re.match(r"^ {4}(\w+)(?: \([^)]*\))?: ?(.*)$", line)
            if match:
                current = match.group(1)
                helps[current] = match.group(2).strip()
            elif current and line.strip():
                helps[current] += " " + line.strip()
    return summary, helps


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        return str if str in args else args[0]
    return annotation


def _list_parser(item_type: type) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [item_type(part.strip()) for part in text.split(",") if part.strip()]

    parse.__name__ = f"comma-separated {item_type.__name__}s"
    return parse


def _bool_or_str(text: str) -> bool | str:
    return {"true": True, "false": False}.get(text.lower(), text)


_bool_or_str.__name__ = "true, false or a name"


def _mapping_parser(value_type: type) -> Callable[[str], dict[str, Any]]:
    def parse(text: str) -> dict[str, Any]:
        pairs = [part.rsplit("=", 1) for part in text.split(",") if part.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(text)
        return {key.strip(): value_type(value) for key, value in pairs}

    parse.__name__ = f"comma-separated regex={value_type.__name__} pairs"
    return parse


class _MergeMapping(argparse.Action):
    """A mapping flag that may be given several times: `--data-field a=x --data-field b=y` is
    `--data-field a=x,b=y`. The first use on the command line replaces the default (or the YAML
    value); a key given twice is an error."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        seen = getattr(namespace, "_merged_mappings", set())
        merged = dict(getattr(namespace, self.dest) or {}) if self.dest in seen else {}
        for key, value in values.items():
            if key in merged:
                parser.error(f"{option_string}: {key!r} is given twice")
            merged[key] = value
        setattr(namespace, self.dest, merged)
        setattr(namespace, "_merged_mappings", seen | {self.dest})


def _field_kwargs(annotation: Any) -> dict[str, Any]:
    """argparse settings for a dataclass field's type (bool, str/int/float, lists, unions, dicts)."""
    origin, args = typing.get_origin(annotation), [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin in (typing.Union, types.UnionType):
        if set(args) == {bool, str}:
            return {"type": _bool_or_str}
        listed = [a for a in args if typing.get_origin(a) is list]
        if listed:
            return {"type": _list_parser((typing.get_args(listed[0]) or (str,))[0])}
        return _field_kwargs(args[0])
    if origin is list:
        return {"type": _list_parser((args or [str])[0])}
    if origin is dict:
        return {"type": _mapping_parser(args[1] if len(args) == 2 else str), "action": _MergeMapping}
    return {"type": annotation} if annotation in (int, float, str) else {}


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_class: type, skip: tuple[str, ...] = (),
                         defaults: dict[str, Any] | None = None, required: tuple[str, ...] = ()) -> None:
    """One `--flag` per field of a dataclass (its type and docstring give the flag's type and help).

    Args:
        parser: Where the flags go.
        config_class: The dataclass.
        skip: Fields that get no flag.
        defaults: Defaults over the dataclass's own.
        required: Fields whose flag must be given.
    """
    hints = typing.get_type_hints(config_class)
    _, helps = docstring_args(config_class)
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = helps.get(field.name, "")
        if field.name in (defaults or {}):  # the docstring's "Default ..." is the dataclass's own
            default = defaults[field.name]
            help_text = re.sub(r"\s*Default\b[^.]*\.?\s*$", "", help_text)
        if default not in (None, False, "", {}, []) and help_text:
            help_text += f" (default: {default})"
        kwargs = _field_kwargs(hints[field.name])
        if typing.get_origin(_unwrap_optional(hints[field.name])) is Literal:
            kwargs = {"choices": list(typing.get_args(_unwrap_optional(hints[field.name])))}
        flag = "--" + field.name.replace("_", "-")
        if field.name in required:
            parser.add_argument(flag, dest=field.name, required=True, help=help_text, **kwargs)
        else:
            parser.add_argument(flag, dest=field.name, default=default, help=help_text, **kwargs)


def add_arguments(parser: argparse.ArgumentParser, fn: Callable[..., Any], skip: tuple[str, ...] = ()) -> None:
    """Add one flag per parameter of `fn`.

    Positional-or-keyword parameters without a default become positional arguments;
    keyword-only ones (after `*`) without a default become required `--flags`. A function
    with a `records` attribute (sections with `name`, `record` (a dataclass), `defaults`,
    `skip` and `required`, as `train.recipe.SECTIONS`) takes its settings as those records: it
    gets one flag per record field instead of one per parameter. A function with `**kwargs` and
    an `extends` attribute (another command function) also gets that function's flags, except
    its own and those named in `extends_exclude`. A `flag_names` attribute ({parameter: flag
    name}) renames flags (e.g. the parameter `as_json` is the flag `--json`).
    """
    records = getattr(fn, "records", None)
    if records is not None:
        for section in records:
            group = parser.add_argument_group(f"{section.name} ({section.record.__name__})",
                                              docstring_args(section.record)[0])
            add_config_arguments(group, section.record, skip=skip + tuple(section.skip),
                                 defaults=section.defaults, required=section.required)
        return
    hints = typing.get_type_hints(fn)
    _, helps = docstring_args(fn)
    params = inspect.signature(fn).parameters
    renamed = getattr(fn, "flag_names", {})
    for name, param in params.items():
        if name in skip or param.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        annotation = _unwrap_optional(hints.get(name, str))
        required = param.default is inspect.Parameter.empty
        kwargs: dict[str, Any] = {"help": helps.get(name, "")}
        if not required:
            kwargs["default"] = param.default
            if param.default not in (None, False, "") and kwargs["help"]:
                kwargs["help"] += f" (default: {param.default})"
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif typing.get_origin(annotation) is list:
            (item,) = typing.get_args(annotation) or (str,)
            kwargs["type"] = _list_parser(item)
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        if required and param.kind is not inspect.Parameter.KEYWORD_ONLY:
            parser.add_argument(name, **kwargs)
        else:  # keyword-only parameters without a default become required flags
            flag = "--" + renamed.get(name, name).replace("_", "-")
            parser.add_argument(flag, dest=name, required=required, **kwargs)
    base = getattr(fn, "extends", None)
    if base is not None:
        own = tuple(n for n in params if params[n].kind is not inspect.Parameter.VAR_KEYWORD)
        add_arguments(parser, base, skip=skip + own + tuple(getattr(fn, "extends_exclude", ())))


def _record_sections(fn: Callable[..., Any]) -> set[str]:
    """Names of the record sections a command's YAML file may use (its own and an extended command's)."""
    names = {section.name for section in getattr(fn, "records", ())}
    base = getattr(fn, "extends", None)
    return names | (_record_sections(base) if base is not None else set())


def flatten_sections(values: dict[str, Any], sections: set[str]) -> dict[str, Any]:
    """A YAML mapping whose record sections (`lora: {r: 16}`) become flat flag names (`r: 16`).

    A key naming a section with a mapping as its value is a section (so `model: ./folder`
    stays the flat field `model`).

    Raises:
        ValueError: a name is set twice (flat and in a section, or in two sections).
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        items = value.items() if key in sections and isinstance(value, dict) else [(key, value)]
        for name, item in items:
            name = str(name).replace("-", "_")
            if name in flat:
                raise ValueError(f"{name!r} is set twice")
            flat[name] = item
    return flat


def command_parser(name: str) -> argparse.ArgumentParser:
    fn = load_command(name)
    summary, _ = docstring_args(fn)
    parser = argparse.ArgumentParser(prog=f"lorakit {name}", description=summary)
    parser.add_argument("--config", dest="_config_file", metavar="FILE.yaml",
                        help="YAML file whose keys set the defaults of these flags")
    add_arguments(parser, fn)
    return parser


def parse(name: str, argv: list[str]) -> dict[str, Any]:
    """Flags for command `name`: YAML config values first, command-line flags over them.

    Raises:
        SystemExit: bad flags or an unknown key in the YAML file (argparse's exit code 2).
    """
    parser = command_parser(name)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", dest="_config_file")
    first, _ = pre.parse_known_args(argv)
    if first._config_file:
        import yaml

        with open(first._config_file) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            parser.error(f"{first._config_file}: expected a mapping of flag names to values")
        known = {a.dest for a in parser._actions}
        try:
            values = flatten_sections(values, _record_sections(load_command(name)))
        except ValueError as err:
            parser.error(f"{first._config_file}: {err}")
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"{first._config_file}: unknown keys {unknown}")
        for action in parser._actions:  # an argument given in the file is no longer required
            if action.dest in values:
                action.required = False
                if not action.option_strings:
                    action.nargs = "?"
        parser.set_defaults(**values)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        import difflib

        flags = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
        close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1)
        parser.error(f"unrecognized argument {unknown[0]!r}" + (f"; did you mean {close[0]}?" if close else ""))
    args = vars(namespace)
    args.pop("_config_file")
    args.pop("_merged_mappings", None)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        from . import __version__

        print(f"lorakit {__version__}")
        return 0
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        import difflib

        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; the commands are {', '.join(COMMANDS)}"
        print(f"lorakit: unknown command {argv[0]!r}{hint}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: lorakit <command> [flags]   (lorakit <command> --help for its flags)", "", "commands:"]
        for name in COMMANDS:
            lines.append(f"  {name:10s} {docstring_args(load_command(name))[0]}")
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nlorakit: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name, rest = argv[0], argv[1:]
    kwargs = parse(name, rest)
    try:
        result = load_command(name)(**kwargs)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as err:  # user errors: one clear line, no traceback
        if "LORAKIT_DEBUG" in os.environ:
            raise
        print(f"lorakit {name}: error: {err}", file=sys.stderr)
        return 2  # a usage error, as argparse exits
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
