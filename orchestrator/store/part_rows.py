"""The rows of a flushed part: a header naming their Arrow schema, then one line of JSON rows per flush.

`orchestrator.store.parts` says why a flushed part holds JSON (the cheapest thing to write in the callback
Ray Tune waits for) and how its lines are written; this module turns rows into those lines and back into Arrow,
with exactly the schema's column types.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

import pyarrow as pa

ROWS_MAGIC = b"GANROWS1\n"  # first line of a part holding JSON rows; Arrow IPC files begin with b"ARROW1"


def _json_value(value: Any) -> Any:
    """What json cannot write itself: timestamps (ISO 8601, read back by their column's type) and numpy
    scalars."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to a results part")


class RowCodec:
    """A table's rows in a part: fitted to the table's Arrow schema on the writer's thread (`fit`: only the
    schema's columns, values of the column's kind), written as JSON (`encode`), and built into Arrow wherever
    they are read or merged (`build`), with exactly the schema's types."""

    def __init__(self, schema: pa.Schema, fit: Callable[[list[dict]], list[dict]] | None = None):
        self.schema = schema
        self.type = pa.struct(list(schema))
        self.names = schema.names
        self._fit = fit
        self.header = ROWS_MAGIC + base64.b64encode(schema.serialize().to_pybytes()) + b"\n"

    def fit(self, rows: list[dict]) -> list[dict]:
        rows = self._fit(rows) if self._fit is not None else rows
        return [{name: row.get(name) for name in self.names} for row in rows]

    def encode(self, rows: list[dict]) -> bytes:
        """Fitted rows as one line of a part (json escapes every newline inside a value)."""
        return json.dumps(rows, default=_json_value, separators=(",", ":")).encode() + b"\n"

    def build(self, rows: list[dict]) -> pa.RecordBatch:
        """Fitted rows as one record batch of the schema."""
        return pa.RecordBatch.from_struct_array(pa.array(rows, type=self.type))


_schemas: dict[bytes, tuple[pa.Schema, list[str]]] = {}  # a part header -> its schema and timestamp columns


def is_rows_part(data: bytes) -> bool:
    """A part of JSON rows (or one whose first write was cut short), rather than an Arrow IPC file."""
    return data.startswith(ROWS_MAGIC) or ROWS_MAGIC.startswith(data[:len(ROWS_MAGIC)])


def decode_rows(data: bytes) -> pa.Table | None:
    """A JSON part's whole lines of rows as an Arrow table of the schema its header names (None before a whole
    header); reading stops at the first line cut short or unreadable, which only a failed write leaves, last."""
    header, newline, body = data[len(ROWS_MAGIC):].partition(b"\n")
    if not newline:
        return None
    if header not in _schemas:
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(header)))
        _schemas[header] = schema, [f.name for f in schema if pa.types.is_timestamp(f.type)]
    schema, timestamps = _schemas[header]
    rows = []
    for line in body.split(b"\n")[:-1]:  # what follows the last newline is a line not yet whole
        try:
            rows.extend(json.loads(line))
        except ValueError:
            break
    for row in rows:
        for name in timestamps:
            if row.get(name) is not None:
                row[name] = datetime.fromisoformat(row[name])
    batch = pa.RecordBatch.from_struct_array(pa.array(rows, type=pa.struct(list(schema))))
    return pa.Table.from_batches([batch], schema=schema)
