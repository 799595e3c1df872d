"""Rows -> domain values: one generic mapper for every table.

`row_mapper(ImageVersion, "versions", status=Status, …)` returns a mapper that turns a row (a RowMapping, or any
mapping of column names; or every row of a result at once, `each`) into the dataclass, field by field:

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
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import sqlalchemy as sa

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


class RowMapper(Generic[T]):
    """Maps rows of `table` to `cls` (see the module's docstring): call it on one row, or give `each` a whole result
    (the columns are looked up once for all its rows: the fast path for listings)."""

    def __init__(self, cls: type[T], table: str, key: str, converters: Mapping[str, Callable[[Any], Any] | Computed]):
        fields = dataclasses.fields(cls)
        unknown = sorted(set(converters) - {f.name for f in fields})
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
        self._cls, self._table, self._key = cls, table, key
        # (field, converter or None, whether the field has a default), decided once.
        self._plan = [
            (
                f.name,
                converters.get(f.name),
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
            )
            for f in fields
            if f.init
        ]

    def __call__(self, row: Row) -> T:
        try:
            values: dict[str, Any] = {}
            for name, convert, optional in self._plan:
                if isinstance(convert, Computed):
                    values[name] = convert.compute(row)
                elif name in row:
                    values[name] = row[name] if convert is None else convert(row[name])
                elif not optional:
                    raise KeyError(f"no column {name!r}")
            return self._cls(**values)
        except _DAMAGE as e:
            raise self._damaged(row.get(self._key, "?"), e) from e

    def each(self, result: sa.Result[Any]) -> list[T]:
        """Every row of `result` (a plain result, not `.mappings()`)."""
        index = {column: i for i, column in enumerate(result.keys())}
        plan = [(name, index.get(name), convert, optional) for name, convert, optional in self._plan]
        key = index.get(self._key)
        cls = self._cls
        out: list[T] = []
        for row in result:
            try:
                values: dict[str, Any] = {}
                for name, i, convert, optional in plan:
                    if isinstance(convert, Computed):
                        values[name] = convert.compute(row._mapping)
                    elif i is not None:
                        values[name] = row[i] if convert is None else convert(row[i])
                    elif not optional:
                        raise KeyError(f"no column {name!r}")
                out.append(cls(**values))
            except _DAMAGE as e:
                raise self._damaged("?" if key is None else row[key], e) from e
        return out

    def _damaged(self, ident: object, error: Exception) -> InfraError:
        return InfraError(
            f"the registry's {self._table} row {self._key}={ident} is damaged: {type(error).__name__}: {error}",
            fix=RESTORE,
        )


def row_mapper(
    cls: type[T], table: str, *, key: str = "id", **converters: Callable[[Any], Any] | Computed
) -> RowMapper[T]:
    """The mapper of `table`'s rows to `cls`; `key` is the column that names a row in damage reports."""
    return RowMapper(cls, table, key, converters)


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
