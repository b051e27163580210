"""Many rows in one statement on PostgreSQL: each column sent as one array, ``unnest`` in SQL.

An executemany of a one-row statement is one Bind/Execute per row for the server and one
round of parameter dumping per row in psycopg; for the ingester's per-device statements
(device state, claim windows, hourly rollup, health buckets) that was most of a batch's
time (docs/performance.md). ``Unnest`` sends the rows as one array per column instead:

    INSERT INTO t (a, b) SELECT * FROM unnest(%s::text[], %s::int8[]) AS v(a, b) ON CONFLICT ...
    UPDATE t SET b = v.b FROM unnest(%s::text[], %s::int8[]) AS v(a, b) WHERE t.a = v.a

Its text never changes with the number of rows, so psycopg prepares it once per connection.
(A multi-row ``VALUES`` did not pay: SQLAlchemy compiled it anew for every row count and the
server parsed it again.)

Rules:
- rows are processed in the order given (an INSERT ... SELECT from ``unnest`` keeps it), so
  callers sort them as they sorted the executemany's, and lock order stays the same;
- strings are sent as ``text[]``, never ``varchar(n)[]``: an explicit cast to ``varchar(n)``
  truncates, while the assignment to the column refuses a value too long, as the one-row
  statement did; integers go as ``int8[]`` and the assignment refuses what the column cannot
  hold (an ``int4`` column), as before;
- float columns may be given ints (psycopg refuses a list of mixed types): converted here;
- JSON columns take the JSON text (``json[]``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import JSON, Boolean, Column, DateTime, Float, Integer, LargeBinary, String, Table
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session


def element_type(column: Column[Any]) -> str:
    """The PostgreSQL type of the array a column's values are sent in."""
    t = column.type
    if isinstance(t, TypeDecorator):  # sqlmodel's AutoString
        t = t.impl_instance
    if isinstance(t, JSON):
        return "json"
    if isinstance(t, String):
        return "text"
    if isinstance(t, Boolean):
        return "bool"
    if isinstance(t, Integer):
        return "int8"
    if isinstance(t, Float):
        return "float8"
    if isinstance(t, DateTime):
        return "timestamptz" if t.timezone else "timestamp"
    if isinstance(t, LargeBinary):
        return "bytea"
    raise TypeError(f"no array type for {column.table.name}.{column.name} ({t!r})")


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Unnest:
    """One PostgreSQL statement over many rows of ``columns`` of ``table``.

    ``template`` is the statement with ``{rows}`` standing for ``unnest(...) AS v(<columns>)``
    (each column is ``v.<name>`` in it) and ``{table}``, ``{columns}`` for the quoted table
    name and column list.
    """

    def __init__(self, table: Table, columns: Sequence[str], template: str) -> None:
        self.columns = tuple(columns)
        types = [element_type(table.c[c]) for c in self.columns]
        self._floats = frozenset(i for i, t in enumerate(types) if t == "float8")
        names = ", ".join(map(quote, self.columns))
        rows = f"unnest({', '.join(f'%b::{t}[]' for t in types)}) AS v({names})"
        self.sql = template.format(rows=rows, table=quote(table.name), columns=names)

    def arrays(self, rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """The parameters: one list per column (``rows`` are tuples in ``columns`` order)."""
        out = [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in self.columns]
        for i in self._floats:
            col = out[i]
            if any(type(v) is not float and v is not None for v in col):
                out[i] = [None if v is None else float(v) for v in col]
        return out

    def execute(self, session: Session, rows: Sequence[Sequence[Any]]) -> None:
        """Run the statement over ``rows`` in the session's transaction (nothing for no rows)."""
        if not rows:
            return
        driver = session.connection().connection.driver_connection
        assert driver is not None  # a checked-out pool connection holds its DB-API connection
        with driver.cursor() as cur:
            cur.execute(self.sql, self.arrays(rows))

    def execute_dicts(self, session: Session, rows: Iterable[Mapping[str, Any]]) -> None:
        """``execute`` for rows as mappings of the column names."""
        columns = self.columns
        self.execute(session, [tuple(r[c] for c in columns) for r in rows])


@contextmanager
def pipelined(session: Session) -> Iterator[None]:
    """On PostgreSQL, the statements ``Unnest`` runs inside are sent without waiting for each
    one's answer (psycopg's pipeline mode): the server runs one while Python builds the next's
    arrays, and the batch waits once, on leaving, where their errors are raised. Elsewhere,
    nothing changes. Nothing inside may read a result."""
    conn = session.connection()
    if conn.dialect.name != "postgresql":
        yield
        return
    driver = conn.connection.driver_connection
    assert driver is not None
    with driver.pipeline():
        yield
