"""Reading params.yaml into the typed `Params` of `schema`, every problem reported at once.

`load_params()` checks every key against the schema's dataclasses and raises one `ParamsError` listing every problem
(unknown key with the closest valid one, wrong type, value out of range, missing key), each with the file and line,
before any stage does heavy work.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from skytune.core.errors import SkytuneError
from skytune.core.params.schema import PARAMS_FILE, Params


class ParamsError(SkytuneError):
    """Every problem found in a params file, one per line."""

    exit_code = 2

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s) in the parameters:\n{lines}")


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate a params file; raise ParamsError naming every problem at once."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(path, [f"file not found (cwd: {Path.cwd()}); run from the repository root"])
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ParamsError(path, [f"not valid YAML: {exc}"]) from exc
    problems: list[str] = []
    params = _build(Params, node, "", path, problems)
    if problems:
        raise ParamsError(path, problems)
    return params


def _where(path: Path, node: yaml.Node | None, key: str) -> str:
    line = f":{node.start_mark.line + 1}" if node is not None else ""
    return f"{path}{line} {key or '<root>'}"


def _build(tp: Any, node: yaml.Node, key: str, path: Path, problems: list[str]) -> Any:
    """Convert a YAML node into `tp`, appending every problem found to `problems`."""
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, node, key, path, problems)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        mapped = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(node, yaml.MappingNode) and len(mapped) == 1:  # a section: its own problems, by key
            return _build(mapped[0], node, key, path, problems)
        # Try each member quietly; report against the first if none fits.
        for member in args:
            trial: list[str] = []
            value = _build(member, node, key, path, trial)
            if not trial:
                return value
        names = " or ".join("null" if a is type(None) else _type_name(a) for a in args)
        problems.append(f"{_where(path, node, key)}: expected {names}, got {_describe(node)}")
        return None
    if tp is type(None):
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return None
        problems.append(f"{_where(path, node, key)}: expected null, got {_describe(node)}")
        return None
    if origin is dict:
        if not isinstance(node, yaml.MappingNode):
            problems.append(f"{_where(path, node, key)}: expected a mapping, got {_describe(node)}")
            return {}
        return {str(k.value): _build(args[1], v, f"{key}.{k.value}", path, problems) for k, v in node.value}
    if origin is tuple:
        if not isinstance(node, yaml.SequenceNode):
            problems.append(f"{_where(path, node, key)}: expected a list, got {_describe(node)}")
            return ()
        return tuple(_build(args[0], item, f"{key}[{i}]", path, problems) for i, item in enumerate(node.value))
    if origin is Literal:
        value = _scalar(node)
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{_where(path, node, key)}: {value!r} is not one of {list(args)}{hint}")
        return value
    if tp in (int, float, str, bool):
        return _build_scalar(tp, node, key, path, problems)
    raise TypeError(f"unsupported schema type {tp!r} at {key}")  # a bug in this module, not in the file


def _build_dataclass(tp: Any, node: yaml.Node, key: str, path: Path, problems: list[str]) -> Any:
    if not isinstance(node, yaml.MappingNode):
        problems.append(f"{_where(path, node, key)}: expected a mapping, got {_describe(node)}")
        return None
    hints = typing.get_type_hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp)}
    values: dict[str, Any] = {}
    seen: set[str] = set()
    for key_node, value_node in node.value:
        name = str(key_node.value)
        full = f"{key}.{name}" if key else name
        if name in seen:
            problems.append(f"{_where(path, key_node, full)}: key given twice")
            continue
        seen.add(name)
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{(key + '.') if key else ''}{close[0]}'?" if close else ""
            problems.append(f"{_where(path, key_node, full)}: unknown key{hint} (valid here: {', '.join(fields)})")
            continue
        value = _build(hints[name], value_node, full, path, problems)
        _check_range(fields[name], value, value_node, full, path, problems)
        values[name] = value
    for name, f in fields.items():
        if name not in seen and f.default is dataclasses.MISSING:
            full = f"{key}.{name}" if key else name
            problems.append(f"{_where(path, node, full)}: missing key '{full}'")
    required = {n for n, f in fields.items() if f.default is dataclasses.MISSING}
    if not required <= values.keys():
        return None
    obj = tp(**values)
    check = getattr(obj, "_problems", None)
    for problem in check() if check is not None else []:
        if isinstance(problem, tuple):  # (the key below this one it is about, the problem): said at that key's line
            below, problem = problem
            full = f"{key}.{below}" if key else below
            problems.append(f"{_where(path, _node_at(node, below) or node, full)}: {problem}")
        else:
            problems.append(f"{_where(path, node, key)}: {problem}")
    return obj


def _node_at(node: yaml.Node, dotted: str) -> yaml.Node | None:
    """The value node of the mapping key `dotted` ("train.method") under `node`, or None."""
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        found = next((value for k, value in node.value if k.value == part), None)
        if found is None:
            return None
        node = found
    return node



_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _build_scalar(tp: type, node: yaml.Node, key: str, path: Path, problems: list[str]) -> Any:
    value = _scalar(node)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if tp is float and isinstance(value, str) and node.style is None and _FLOAT.fullmatch(value):
        value, ok = float(value), True  # YAML 1.1 reads a plain 1e-4 (as `dvc exp run -S` writes it) as a string
    if tp is str and isinstance(value, str):
        ok = True
    if not ok:
        problems.append(f"{_where(path, node, key)}: expected {_type_name(tp)}, got {_describe(node)}")
        return None
    return value


def _check_range(f: dataclasses.Field, value: Any, node: yaml.Node, key: str, path: Path, problems: list[str]) -> None:
    if not f.metadata or not isinstance(value, int | float) or isinstance(value, bool):
        return
    checks = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
              "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
    for name, bound in f.metadata.items():
        test, sign = checks[name]
        if not test(value, bound):
            problems.append(f"{_where(path, node, key)}: {value} is out of range, must be {sign} {bound}")


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return node  # compared against scalars it fails, and _describe names it
    return yaml.SafeLoader("").construct_object(node)


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    value = _scalar(node)
    return f"{type(value).__name__} {value!r}"


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))
