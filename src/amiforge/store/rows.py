"""Rows -> domain values: one generic mapper for every table.

`row_mapper(ImageVersion, "versions", status=Status, …)` returns a function that turns a row (a RowMapping, or any
mapping of column names) into the dataclass, field by field:

- a field whose column is in the row takes its value, through the field's converter if one is given;
- a field with a default may be missing from the row (a listing that leaves the build log out, for example);
- a field stored under no column of its own is `Computed` from the whole row (NAME@N from two joined columns).

A row that cannot become the dataclass (an unknown status, a list where a mapping belongs, a missing column …) is
damage, not a crash: an InfraError naming the table and the row (`key` is the column that identifies it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from amiforge.errors import InfraError
from amiforge.store.boundary import RESTORE

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

Row = Mapping[Any, Any]  # a RowMapping, or any mapping of column names

# What a row mapper may meet while converting: anything else is a bug and stays one.
_DAMAGE = (ValueError, TypeError, KeyError, AttributeError, IndexError)


@dataclass(frozen=True)
class Computed:
    """A field that no column holds under its name: computed from the whole row."""

    compute: Callable[[Row], Any]


def row_mapper(
    cls: type[T], table: str, *, key: str = "id", **converters: Callable[[Any], Any] | Computed
) -> Callable[[Row], T]:
    """A function mapping one row of `table` to `cls` (see the module's docstring)."""
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(converters) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    # (field, converter or None, whether the field has a default), decided once.
    plan = [
        (
            f.name,
            converters.get(f.name),
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
        )
        for f in fields
        if f.init
    ]

    def mapped(row: Row) -> T:
        try:
            values: dict[str, Any] = {}
            for name, convert, optional in plan:
                if isinstance(convert, Computed):
                    values[name] = convert.compute(row)
                elif name in row:
                    values[name] = row[name] if convert is None else convert(row[name])
                elif not optional:
                    raise KeyError(f"no column {name!r}")
            return cls(**values)
        except _DAMAGE as e:
            raise InfraError(
                f"the registry's {table} row {key}={row.get(key, '?')} is damaged: {type(e).__name__}: {e}",
                fix=RESTORE,
            ) from e

    mapped.__name__ = mapped.__qualname__ = f"{cls.__name__.lower()}_from_row"
    return mapped


# --- converters shared by several tables ----------------------------------------------------------------------


def int_or_none(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def float_or_none(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def text_or_empty(value: object) -> str:
    """A text column that reads NULL as empty."""
    return "" if value is None else str(value)


def json_object(value: object) -> dict[str, object]:
    """A JSON column that must hold an object (null reads as empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, found {type(value).__name__}")
    return value


def loose_object(value: Any) -> dict[str, object]:
    """A JSON column holding an object, read leniently: null as empty, and anything `dict()` accepts."""
    return dict(value or {})
