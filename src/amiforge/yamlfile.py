"""Small YAML config files (recipes, policies) read so that every problem points at a file, a line and a field.

This module owns the machinery the file formats share: reading the bytes with a size cap and a UTF-8 check
(`read_text()`); parsing once into PyYAML's node tree (for line numbers) and constructing the data from the
same nodes, with duplicate keys and alias bombs reported as problems (`parse_yaml()`); turning each pydantic
error into a `Problem` with a dotted field (`dotted()`), its line (`line_of()`) and a fix a person can act on
(`problems_from_validation()`); and raising them all together as one ConfigError (`raise_problems()`).
Validators signal a problem with `fail()`, which carries its own fix through to the Problem; the field types every
format uses alike (a string matching a pattern, a non-empty string, a duration in the one grammar of
`amiforge.durations`) are built here once, so a bad value reads the same in a recipe, a policy or a strategy.

What differs between formats (the noun used in messages, the root model, the union tags its models insert into
pydantic's error locations) is described once per format by a `YamlKind`.
"""

from __future__ import annotations

import difflib
import json
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ValidationError, WithJsonSchema
from pydantic_core import PydanticCustomError

from amiforge import durations
from amiforge.errors import ConfigError, Problem
from amiforge.inputs import read_input

__all__ = [
    "MAX_YAML_NODES",
    "NonEmptyStr",
    "YamlKind",
    "checked_duration",
    "dotted",
    "duration_schema",
    "fail",
    "line_of",
    "matching",
    "parse_mapping",
    "parse_yaml",
    "problems_from_validation",
    "raise_problems",
    "read_text",
    "short",
    "validate_mapping",
    "yaml_type",
]

# YAML aliases share nodes; counting visits with expansion stops "billion laughs" before pydantic does.
MAX_YAML_NODES = 100_000


@dataclass(frozen=True)
class YamlKind:
    """One file format: how messages name it and which pydantic model validates it."""

    noun: str  # "recipe", "policy": used in messages ("the recipe must be a YAML text file")
    model: type[BaseModel]  # the root model, to list the keys allowed where an unknown key appears
    schema_hint: str  # the fallback fix: where to read every key and the values it allows
    max_bytes: int  # a config file is a few KB; anything far bigger is a mistake (or an attack on the parser)
    missing_fix: str  # fix for a missing file; `{path}` is replaced by the path asked for
    default_name: str  # the usual file name, suggested when a directory is given
    # Tags of our own callable discriminators (in <angle brackets>); pydantic inserts them into error locations,
    # where they are never a YAML key, so they are dropped from fields and resolved to their model.
    tagged: Mapping[str, type[BaseModel]] = field(default_factory=dict)


def fail(message: str, fix: str, *, key: str | None = None) -> PydanticCustomError:
    """A validation error carrying its own fix; `key` names a sub-key the problem belongs to (e.g. `type`)."""
    ctx: dict[str, Any] = {"fix": fix}
    if key is not None:
        ctx["key"] = key
    # The message goes in as a context value, never as the template, so braces in user input stay literal.
    return PydanticCustomError("amiforge", "{message}", {**ctx, "message": message})


def short(value: object, limit: int = 40) -> str:
    """repr() of a value, cut to `limit` characters, for messages quoting user input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def yaml_type(value: object) -> str:
    """How YAML would call the type of a value, for messages a file's author understands."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean (true/false)"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


# ----------------------------------------------------------------------------------------------------------
# Field types the formats share


def matching(pattern: str, what: str, allowed: str, example: str) -> tuple[AfterValidator, WithJsonSchema]:
    """The metadata of a string checked against `pattern`: a message saying what is `allowed` and a fix with an
    `example`, and the pattern in the JSON Schema so editors flag the mistake too. Use: `Annotated[str, *matching(…)]`.
    """
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if compiled.fullmatch(value) is None:
            raise fail(f"{short(value)} is not a valid {what}: {allowed}", f"use something like {example}")
        return value

    return AfterValidator(check), WithJsonSchema({"type": "string", "pattern": f"^{pattern}$"})


def _non_empty(value: str) -> str:
    if not value.strip():
        raise fail("must not be empty", "write a value, or remove the key if it is optional")
    if "\x00" in value:
        raise fail("must not contain a NUL character", "remove it")
    return value


NonEmptyStr = Annotated[str, AfterValidator(_non_empty), WithJsonSchema({"type": "string", "minLength": 1})]


def checked_duration(value: object, *, allow_zero: bool = False, maximum: float = durations.MAX_SECONDS) -> float:
    """Seconds in `value`, read by `durations.parse_duration()`, for a validator: a refused value is a located
    problem (`fail()`) with the grammar's own message and fix, the same in every file format."""
    try:
        return durations.parse_duration(value, what="", allow_zero=allow_zero, maximum=maximum)
    except ConfigError as e:
        raise fail(e.message, e.fix or f"use {durations.FORMS}") from None


def duration_schema(*, minimum: float = 0.0, maximum: float = durations.MAX_SECONDS, note: str = "") -> WithJsonSchema:
    """The JSON Schema of a duration field: seconds from `minimum` to `maximum`, or a string in the grammar."""
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": minimum, "maximum": maximum},
                {"type": "string", "pattern": f"^(?:{durations.PATTERN})$"},
            ],
            "description": f"a duration: {durations.FORMS}{note}",
        },
        mode="validation",
    )


# ----------------------------------------------------------------------------------------------------------
# Reading and parsing


def read_text(path: Path, kind: YamlKind) -> str:
    """The text of the file at `path`; ConfigError if it is missing, a directory, unreadable, too big or not UTF-8."""
    noun = kind.noun
    if path.is_dir():
        raise ConfigError(
            f"{noun} path {path} is a directory",
            problems=[Problem(message=f"is a directory, not a {noun} file", file=str(path))],
            fix=f"pass the YAML file, e.g. {path / kind.default_name}",
        )
    if not path.exists() and not path.is_symlink():
        raise ConfigError(
            f"{noun} file not found: {path}",
            problems=[Problem(message="no such file", file=str(path))],
            fix=kind.missing_fix.replace("{path}", str(path)),
        )
    # Regular files only (a FIFO would block, /dev/zero never ends); one byte past the cap says "too big".
    raw = read_input(path, what=f"{noun} file", max_bytes=kind.max_bytes + 1, fix=f"pass the {noun} YAML file")
    if len(raw) > kind.max_bytes:
        raise_problems(
            kind,
            path,
            [
                Problem(
                    message=f"file is larger than {kind.max_bytes} bytes",
                    file=str(path),
                    fix=f"a {noun} is a small YAML file; check you passed the right path",
                )
            ],
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise_problems(
            kind,
            path,
            [
                Problem(
                    message=f"not UTF-8 text (bad byte at offset {e.start})",
                    file=str(path),
                    fix=f"save the {noun} as a UTF-8 YAML text file",
                )
            ],
        )


class _Loader(yaml.SafeLoader):
    """SafeLoader whose timestamps never raise.

    PyYAML raises a bare ValueError (no line, not a YAMLError) for an impossible date such as 2027-02-30; here it
    stays the text it was, so the schema reports it at its field and line like any other bad value.
    """


def _timestamp(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> object:
    try:
        return loader.construct_yaml_timestamp(node)
    except (ValueError, OverflowError):
        return loader.construct_scalar(node)


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp)


def parse_yaml(text: str, file: str, *, noun: str) -> tuple[yaml.Node | None, object, list[Problem]]:
    """Parse once into the node tree (lines) and construct the data from the same nodes.

    Returns (root node or None for an empty document, the data, problems). Syntax errors, alias bombs and
    duplicate keys come back as problems, never as exceptions.
    """
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader already rejects control characters here
        node = loader.get_single_node()
        if node is None:
            return None, None, []
        problems = _check_nodes(node, file, noun)
        if problems:  # too large to construct safely
            return node, None, problems
        # Find duplicate keys before construction: merge keys (<<) rewrite the mapping nodes in place.
        duplicates = _duplicate_keys(node, file)
        data = loader.construct_document(node)
        return node, data, duplicates
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        message = " ".join(str(x) for x in (e.context, e.problem) if x)
        return (
            None,
            None,
            [
                Problem(
                    message=f"YAML syntax error: {message}",
                    file=file,
                    line=mark.line + 1 if mark is not None else None,
                    fix="check indentation, colons and quoting on that line (and the one before)",
                )
            ],
        )
    except yaml.YAMLError as e:  # e.g. ReaderError: control characters in the text
        position = getattr(e, "position", None)
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else None
        return (
            None,
            None,
            [
                Problem(
                    message=f"not valid YAML: {e}",
                    file=file,
                    line=line,
                    fix=f"remove non-text characters; the {noun} must be a YAML text file",
                )
            ],
        )
    except ValueError:  # PyYAML's int constructor: more digits than Python converts (4300)
        return (
            None,
            None,
            [
                Problem(
                    message="a number has more digits than amiforge reads (over 4300)",
                    file=file,
                    fix="numbers in a {noun} are small; check the file is a {noun}".replace("{noun}", noun),
                )
            ],
        )
    except RecursionError:
        return (
            None,
            None,
            [
                Problem(
                    message="YAML nesting is too deep",
                    file=file,
                    fix=f"a {noun} is a few levels deep; check the file is a {noun}",
                )
            ],
        )
    finally:
        if loader is not None:
            loader.dispose()


def _check_nodes(root: yaml.Node, file: str, noun: str) -> list[Problem]:
    seen = 0
    stack = [root]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            return [
                Problem(
                    message=f"the YAML expands to more than {MAX_YAML_NODES} values (aliases?)",
                    file=file,
                    fix=f"a {noun} is small; remove the anchors/aliases that multiply it",
                )
            ]
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.extend((k, v))
    return []


def _duplicate_keys(root: yaml.Node, file: str) -> list[Problem]:
    problems: list[Problem] = []
    stack: list[tuple[yaml.Node, tuple[str | int, ...]]] = [(root, ())]
    visited: set[int] = set()
    while stack:
        node, loc = stack.pop()
        if id(node) in visited:  # aliases share nodes; report each once
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*loc, i)) for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.value == "<<":
                    continue
                if key.value in seen:
                    problems.append(
                        Problem(
                            message=f"key {key.value!r} is repeated; YAML silently keeps only the last",
                            file=file,
                            line=key.start_mark.line + 1,
                            field=dotted((*loc, key.value)),
                            fix="remove or merge the duplicate",
                        )
                    )
                seen.add(key.value)
                stack.append((value, (*loc, key.value)))
    return problems


def parse_mapping(
    text: str, path: Path, kind: YamlKind, *, top_keys: str, empty_fix: str, mapping_fix: str
) -> tuple[yaml.Node, dict[str, Any], list[Problem]]:
    """`parse_yaml`, then refuse (raise) an empty file or a top level that is not a mapping — every format here is
    a mapping at the top. Returns the node, the mapping, and the problems found so far (e.g. duplicate keys, which
    YAML accepts) for the caller to report with its own. `top_keys` names the usual top-level keys in messages."""
    file = str(path)
    node, data, problems = parse_yaml(text, file, noun=kind.noun)
    if node is not None and isinstance(data, dict):
        return node, data, problems
    if not problems:
        if node is None:
            problems = [Problem(message=f"the {kind.noun} file is empty", file=file, fix=empty_fix)]
        else:
            problems = [
                Problem(
                    message=f"the {kind.noun} must be a mapping ({top_keys}), got {yaml_type(data)}",
                    file=file,
                    line=node.start_mark.line + 1,
                    fix=mapping_fix,
                )
            ]
    raise_problems(kind, path, problems)


M = TypeVar("M", bound=BaseModel)


def validate_mapping(
    model: type[M],
    parsed: tuple[yaml.Node, dict[str, Any], list[Problem]],
    path: Path,
    kind: YamlKind,
    *,
    context: Mapping[str, object] | None = None,
) -> M:
    """Validate what `parse_mapping()` returned (plus any problems the caller found itself) with `model`. Raises
    one ConfigError with every problem at once: those found so far (e.g. duplicate keys, which YAML accepts) and
    each of pydantic's, with its field, line and fix."""
    node, data, problems = parsed
    try:
        result = model.model_validate(data, context=context)
    except ValidationError as e:
        raise_problems(kind, path, problems + problems_from_validation(e, node, str(path), kind))
    if problems:
        raise_problems(kind, path, problems)
    return result


def raise_problems(kind: YamlKind, path: Path, problems: Sequence[Problem]) -> NoReturn:
    """Raise one ConfigError holding every problem, each once, in file order (line-less ones last)."""
    unique = list(dict.fromkeys(problems))
    unique.sort(key=lambda p: (p.line is None, p.line or 0, p.field or ""))
    raise ConfigError(
        f"{kind.noun} {path} is invalid: {len(unique)} problem(s)",
        problems=unique,
        fix="fix each problem listed; " + kind.schema_hint,
    )


# ----------------------------------------------------------------------------------------------------------
# Locations: a pydantic `loc` → the dotted field a person reads, and the line it is on


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def dotted(loc: Sequence[str | int]) -> str:
    """`("steps", 1, "file", "src")` → `steps[1].file.src`; keys that are not identifiers are JSON-quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def line_of(root: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """1-based line of the deepest YAML node along `loc`: the key itself, or its nearest existing parent."""
    if root is None:
        return None
    node = root
    line = root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):  # the last duplicate is the one YAML keeps
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


# ----------------------------------------------------------------------------------------------------------
# From a pydantic error to a Problem


def problems_from_validation(
    error: ValidationError, root: yaml.Node | None, file: str, kind: YamlKind
) -> list[Problem]:
    """One Problem per pydantic error, with field, line and fix."""
    return [_problem_from_error(err, root, file, kind) for err in error.errors()]


def _clean_loc(loc: Sequence[str | int], ctx: Mapping[str, Any], kind: YamlKind) -> tuple[str | int, ...]:
    """Drop the union tags pydantic inserts (they are ours, in <angle brackets>, never a YAML key)."""
    parts = [p for p in loc if not (isinstance(p, str) and p in kind.tagged) and p != "[key]"]
    if isinstance(ctx.get("key"), str):
        parts.append(ctx["key"])
    return tuple(parts)


def _unwrap(tp: object) -> object:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _model_at(loc: Sequence[str | int], kind: YamlKind) -> type[BaseModel] | None:
    """The model class at a raw pydantic `loc` (tags included), to list the keys it allows."""
    tp: object = kind.model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, str) and part in kind.tagged:
            tp = kind.tagged[part]
        elif isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
            model_field = tp.model_fields.get(part)
            if model_field is None:
                return None
            tp = model_field.annotation
        elif get_origin(tp) is list and isinstance(part, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _problem_from_error(err: Mapping[str, Any], root: yaml.Node | None, file: str, kind: YamlKind) -> Problem:
    raw_loc: tuple[str | int, ...] = tuple(err.get("loc", ()))
    ctx: Mapping[str, Any] = err.get("ctx") or {}
    loc = _clean_loc(raw_loc, ctx, kind)
    if err.get("type") == "invalid_key" and loc:  # a non-string mapping key, not a list index
        loc = (*loc[:-1], str(loc[-1]))
    message, fix = _explain(err, raw_loc, loc, ctx, kind)
    return Problem(message=message, file=file, line=line_of(root, loc), field=dotted(loc) or None, fix=fix)


_EXPECTED = {
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "int_type": "a whole number",
    "bool_type": "true or false",
}


def _explain(
    err: Mapping[str, Any],
    raw_loc: tuple[str | int, ...],
    loc: tuple[str | int, ...],
    ctx: Mapping[str, Any],
    kind: YamlKind,
) -> tuple[str, str]:
    err_type = str(err.get("type", ""))
    value = err.get("input")
    key = str(loc[-1]) if loc else ""
    if err_type == "amiforge":
        return str(err["msg"]), str(ctx.get("fix") or kind.schema_hint)
    if err_type == "extra_forbidden":
        model = _model_at(raw_loc[:-1], kind)
        allowed = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return (
            f"unknown key {key!r}; allowed keys here: {', '.join(allowed) or 'none'}",
            f"{hint}remove or rename it",
        )
    if err_type == "missing":
        return f"required key {key!r} is missing", f"add '{key}: …' here"
    if err_type == "invalid_key":
        return f"key {short(value)} is not a string", f'quote it: "{value}"'
    if value is None and err_type.endswith("_type"):
        return f"no value given; expected {_EXPECTED.get(err_type, 'a value')}", "write a value after the ':'"
    if err_type == "string_type":
        quoted = f'"{value}"' if isinstance(value, int | float | bool) else '"42"'
        example = f"{key}: {quoted}" if loc and isinstance(loc[-1], str) else quoted
        return f"expected a string, got {yaml_type(value)} ({short(value)})", f"quote it: {example}"
    if err_type == "list_type":
        return (
            f"expected a list, got {yaml_type(value)}",
            "write a YAML list, e.g. [a, b] or one '- item' per line",
        )
    if err_type in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping (key: value), got {yaml_type(value)}", "write it as {key: value, …}"
    if err_type in ("int_type", "int_parsing", "int_from_float"):
        return (
            f"expected a whole number, got {yaml_type(value)} ({short(value)})",
            "write an integer, e.g. 80",
        )
    if err_type in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {short(value)}", "write true or false"
    if err_type == "literal_error":
        return f"{short(value)} is not allowed: {err.get('msg', '')}", "use one of the values listed"
    if err_type in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return f"{short(value)} is out of range: {err.get('msg', '')}", "use a value within the stated range"
    if err_type == "too_short":
        return f"{err.get('msg', 'too short')}", "add at least one item"
    return f"{err.get('msg', 'invalid value')} (got {short(value)})", kind.schema_hint
