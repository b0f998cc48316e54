"""The typed-configuration toolkit every recipe of this project is built with.

A recipe is a YAML file whose sections mirror dataclasses (a *root* dataclass whose fields are
*section* dataclasses). Command-line overrides are dotted ``section.key=value`` strings whose
values are read as YAML. Every key is checked before any work starts: an unknown key, a wrong
type or an impossible value is a one-line :class:`ConfigError` naming the key (and the closest
valid one).

    tree = read_recipe("configs/demo.yaml", ["optim.lr=1e-3"])   # plain data, overrides applied
    tree = read_recipe(["base.yaml", "mine.yaml"], sources=where)  # stacked; where: key -> file
    config = root_from_tree(MyRoot, tree)                         # typed, checked, validated

A section validates itself in ``validate(prefix)``, with the checks below (``positive``,
``non_negative``, ``fraction``, ``one_of``, ``interval``) or :func:`fail`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError", "Root", "build_dataclass", "check_kwargs_have_values", "closest_hint", "closest_names", "fail", "fraction",
    "interval", "load_yaml_file", "non_negative", "one_of", "option_overrides", "parse_override", "positive",
    "read_recipe", "root_from_tree",
    "to_plain",
]


class ConfigError(ValueError):
    """A bad configuration value; the message is one line and names the key."""


def fail(key: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"config error: {key}: {message}")


def closest_hint(key: str, options: list[str], prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` for the closest option, else the list of valid ones."""
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    if match:
        return f" (did you mean {prefix + match[0]!r}?)"
    return f" (valid keys: {', '.join(options)})"


def closest_names(name: str, options: typing.Iterable[str], listed_by: str) -> str:
    """`` (closest: a, b, c)`` from a long list of names (timm's models, optimizers), else where
    the list is (``listed_by``)."""
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.6)
    return f" (closest: {', '.join(close)})" if close else f" ({listed_by} lists them)"


def to_plain(obj: Any) -> Any:
    """Tuples become lists (YAML and JSON have only lists), recursively."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# Checks a section's validate() uses
# --------------------------------------------------------------------------------------------


def positive(section: Any, prefix: str, *names: str) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            fail(f"{prefix}.{name}", f"must be positive, got {getattr(section, name)}")


def non_negative(section: Any, prefix: str, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 0:
            fail(f"{prefix}.{name}", f"must be >= 0, got {getattr(section, name)}")


def fraction(section: Any, prefix: str, *names: str) -> None:
    """Each value in [0, 1]."""
    for name in names:
        if not 0.0 <= getattr(section, name) <= 1.0:
            fail(f"{prefix}.{name}", f"must be in [0, 1], got {getattr(section, name)}")


def one_of(section: Any, prefix: str, name: str, choices: typing.Sequence[str]) -> None:
    if getattr(section, name) not in choices:
        fail(f"{prefix}.{name}", f"must be one of {list(choices)}, got {getattr(section, name)!r}")


def interval(section: Any, prefix: str, name: str, low: float, high: float, open_low: bool = True) -> None:
    """A ``(min, max)`` pair with ``low < min <= max <= high`` (``low <= min`` when not ``open_low``)."""
    lo, hi = getattr(section, name)
    ok_low = low < lo if open_low else low <= lo
    if not (ok_low and lo <= hi <= high):
        rule = f"{low:g} {'<' if open_low else '<='} min <= max" + (f" <= {high:g}" if high != float("inf") else "")
        fail(f"{prefix}.{name}", f"must satisfy {rule}, got {(lo, hi)}")


def check_kwargs_have_values(key: str, kwargs: dict[str, Any], example: str = "depth: 2") -> None:
    """YAML reads ``{depth:2}`` (no space) as ``{"depth:2": None}`` and timm drops None keywords
    silently: refuse it with the fix."""
    for name, value in kwargs.items():
        if value is None:
            fail(key, f"{name!r} has no value (write {{{example}}}, with a space after ':')")


# --------------------------------------------------------------------------------------------
# Plain data -> dataclasses
# --------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        fail(key, f"expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail(key, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # e.g. output_dir=2024
            return str(value)
        fail(key, f"expected a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            fail(key, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # one item for a list: train.trackers=tensorboard, knn.k=20
        if not isinstance(value, (list, tuple)):
            fail(key, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            fail(key, f"expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in a dataclass


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join(names) + " or null"


def build_dataclass(cls: type, data: dict[str, Any] | None, prefix: str) -> Any:
    """Instantiate ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        fail(prefix, f"expected a mapping of options, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"config error: unknown key {full!r}"
                              f"{closest_hint(str(key), names, prefix + '.' if prefix else '')}")
        tp = hints[key]
        kwargs[key] = build_dataclass(tp, value, full) if dataclasses.is_dataclass(tp) else _coerce(value, tp, full)
    return cls(**kwargs)


class Root:
    """Mixin of a recipe's root dataclass: every section validated, and plain-data / YAML views."""

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            getattr(self, f.name).validate(f.name)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def root_from_tree(root_cls: type, tree: dict[str, Any], section_types: dict[str, type] | None = None) -> Any:
    """Build and validate a root dataclass from nested plain data; ``section_types`` replaces a
    section's annotated type (a method's own config class for the ``method`` section)."""
    hints = {**typing.get_type_hints(root_cls), **(section_types or {})}
    for key in tree:
        if key not in hints:
            raise ConfigError(f"config error: unknown section {key!r}{closest_hint(str(key), list(hints))}")
    root = root_cls(**{name: build_dataclass(tp, tree.get(name), name) for name, tp in hints.items()})
    root.validate()
    return root


# --------------------------------------------------------------------------------------------
# YAML recipes and dotted overrides
# --------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """``optim.lr=5e-4`` -> (``optim.lr``, 5e-4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"config error: override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"config error: override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def option_overrides(parser: Any, section: str, argv: list[str]) -> list[str]:
    """A command's own options also as ``section.key=value`` words (``plan.gpu_memory=40GiB`` is
    ``--gpu-memory 40GiB``), the grammar of recipe overrides; words of other sections pass through.
    A switch takes true/false; a list option a YAML list or comma-separated values."""
    # argparse has no public list of a parser's options; its actions are stable since Python 3.2
    options = {a.dest: a for a in parser._actions if a.option_strings}
    out: list[str] = []
    for word in argv:
        head, sep, text = word.partition("=")
        if not sep or not head.startswith(f"{section}.") or word.startswith("-"):
            out.append(word)
            continue
        key = head[len(section) + 1:]
        action = options.get(key.replace("-", "_"))
        if action is None:
            listed = [f"{section}.{d}" for d in sorted(options) if d != "help"]
            raise ConfigError(f"config error: {head}: unknown key{closest_hint(head, listed)}; "
                              f"{section} keys: {', '.join(listed)}")
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # a switch (store_true / BooleanOptionalAction)
            value = parse_override(word)[1]
            if not isinstance(value, bool):
                fail(head, f"expected true/false, got {text!r}")
            negative = [o for o in action.option_strings if o.startswith("--no-")]
            flag = next((o for o in action.option_strings if not o.startswith("--no-")), flag)
            out += [flag] if value else negative[:1]
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int):
            value = parse_override(word)[1]
            items = value if isinstance(value, list) else [v.strip() for v in str(value).split(",") if v.strip()]
            out += [flag, *(str(v) for v in items)]
        else:
            out += [flag, text]
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"config error: {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def read_recipe(paths: str | Path | typing.Sequence[str | Path] | None = None, overrides: list[str] | None = None,
                sources: dict[str, str] | None = None) -> dict[str, Any]:
    """The plain tree of YAML recipes with dotted overrides applied (not yet type-checked).

    Several recipes stack, later ones winning key by key; a recipe may name another as its
    ``base`` (a path relative to it), which it then overrides the same way. Within a section a value
    replaces the base's whole (lists and mappings such as ``model.kwargs`` included). An override
    given twice is an error. ``sources``, when given, receives ``{"section.key": where it was set}``."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    tree: dict[str, Any] = {}
    sources = {} if sources is None else sources
    for path in paths:
        _merge(tree, _read_yaml(Path(path), ()), sources)
    seen: dict[str, Any] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        if key in seen:
            raise ConfigError(f"config error: {key} is overridden twice ({seen[key]!r}, then {value!r}); give it once")
        seen[key] = value
        _set_dotted(tree, key, value)
        sources[key] = "override"
    return tree


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """One recipe file with its ``base`` chain merged under it; leaves are ``(value, path)`` pairs."""
    if not path.is_file():
        raise ConfigError(f"config error: recipe file {str(path)!r} does not exist"
                          + (f" (the base of {str(chain[-1])!r})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"config error: recipe bases form a loop: {' -> '.join(map(str, (*chain, path)))}")
    tree = load_yaml_file(path)
    if not isinstance(tree, dict):
        raise ConfigError(f"config error: {path} must hold a mapping of sections")
    merged: dict[str, Any] = {}
    base = tree.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"config error: {path}: base must be a recipe path, got {base!r}")
        merged = _read_yaml(path.parent / base, (*chain, path.resolve()))
    for section, values in tree.items():
        if values is None:  # an empty section changes nothing
            continue
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update({k: (v, str(path)) for k, v in values.items()})
        else:
            merged[section] = {k: (v, str(path)) for k, v in values.items()} if isinstance(values, dict) \
                else (values, str(path))
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (the plain
    loader silently keeps the last value, hiding an edit that did not take)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                first, again = seen[key], key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {first.line + 1}, then line "
                    f"{again.line + 1}); keep one", again)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path: str | Path) -> Any:
    """A YAML file's data; a syntax error or a repeated key is one :class:`ConfigError` naming the
    file, line and column (YAML's own message spans several lines)."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = ": ".join(part for part in (getattr(e, "context", None), getattr(e, "problem", None)) if part)
        raise ConfigError(f"config error: {where}: {what or str(e).splitlines()[0]}"
                          + ("" if "twice" in what else " (not valid YAML; fix the file there)")) from None


def _merge(tree: dict[str, Any], layer: dict[str, Any], sources: dict[str, str]) -> None:
    """Put a file's ``(value, source)`` leaves into ``tree`` (key by key within sections)."""
    for section, values in layer.items():
        if isinstance(values, tuple):  # a section that is not a mapping: left for the type check
            tree[section], sources[section] = values
            continue
        node = tree.setdefault(section, {})
        if not isinstance(node, dict):
            node = tree[section] = {}
        for key, (value, source) in values.items():
            node[key] = value
            sources[f"{section}.{key}"] = source


def annotated_yaml(tree: dict[str, Any], sources: dict[str, str]) -> str:
    """``tree`` (sections of keys) as YAML with ``# where it was set`` after every key (a recipe
    file, ``override`` or ``default``); still valid YAML, so it can be saved as a recipe."""
    lines = []
    for section, values in tree.items():
        lines.append(f"{section}:")
        for key, value in values.items():
            text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False)
            text = text.removesuffix("\n...\n").strip()
            dotted = f"{section}.{key}"
            deeper = [v for k, v in sources.items() if k.startswith(dotted + ".")]  # e.g. model.kwargs.depth=3
            lines.append(f"  {key}: {text}  # {sources.get(dotted) or (deeper[-1] if deeper else 'default')}")
    return "\n".join(lines) + "\n"
