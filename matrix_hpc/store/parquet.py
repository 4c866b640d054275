"""Parquet export: the Arrow schema comes from the payload's descriptor, not from the rows.

Every export of a job has the same columns in the same order with the same types, empty or not:
the payload's fields in declaration order (proto int32 -> int32, uint64 -> uint64, bytes ->
binary, enums -> their names, messages -> structs, repeated -> lists, maps -> lists of
key/value structs, which Hugging Face ``datasets`` loads as it is), then the task's metadata
typed as in the task envelope. ``google.protobuf.Timestamp`` becomes a UTC timestamp; other
well-known types and self-recursive messages are stored as JSON text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from matrix_hpc._gen.v1 import task_pb2

_T = FieldDescriptor
_SCALARS = {
    _T.TYPE_DOUBLE: pa.float64(), _T.TYPE_FLOAT: pa.float32(),
    _T.TYPE_INT64: pa.int64(), _T.TYPE_SINT64: pa.int64(), _T.TYPE_SFIXED64: pa.int64(),
    _T.TYPE_UINT64: pa.uint64(), _T.TYPE_FIXED64: pa.uint64(),
    _T.TYPE_INT32: pa.int32(), _T.TYPE_SINT32: pa.int32(), _T.TYPE_SFIXED32: pa.int32(),
    _T.TYPE_UINT32: pa.uint32(), _T.TYPE_FIXED32: pa.uint32(),
    _T.TYPE_BOOL: pa.bool_(), _T.TYPE_STRING: pa.string(), _T.TYPE_BYTES: pa.binary(),
    _T.TYPE_ENUM: pa.string(),
}
_TIMESTAMP = "google.protobuf.Timestamp"
_ENVELOPE = task_pb2.Task.DESCRIPTOR
META_FIELDS = ("task_id", "row_id", "row_index", "trial", "retries")


def _as_json(desc: Descriptor, seen: tuple[str, ...]) -> bool:
    return desc.full_name.startswith("google.protobuf.") or desc.full_name in seen


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _field_type(f: FieldDescriptor, seen: tuple[str, ...]) -> pa.DataType:
    if f.message_type is None:
        t = _SCALARS[f.type]
    elif _is_map(f):
        key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        return pa.list_(pa.struct([pa.field("key", _field_type(key, seen), nullable=False),
                                   pa.field("value", _field_type(value, seen))]))
    elif f.message_type.full_name == _TIMESTAMP:
        t = pa.timestamp("us", tz="UTC")
    elif _as_json(f.message_type, seen):
        t = pa.string()
    else:
        t = message_struct(f.message_type, seen)
    return pa.list_(t) if f.is_repeated else t


def message_struct(desc: Descriptor, seen: tuple[str, ...] = ()) -> pa.StructType:
    seen = (*seen, desc.full_name)
    return pa.struct([pa.field(f.name, _field_type(f, seen)) for f in desc.fields])


def _value(f: FieldDescriptor, v, seen: tuple[str, ...]):
    if f.type == _T.TYPE_ENUM:
        known = f.enum_type.values_by_number.get(v)
        return known.name if known else str(v)  # an enum value this descriptor does not know
    if f.message_type is None:
        return v
    if f.message_type.full_name == _TIMESTAMP:
        return v.ToDatetime(tzinfo=UTC)
    if _as_json(f.message_type, seen):
        return json_format.MessageToJson(v, preserving_proto_field_name=True, indent=None)
    return message_row(v, seen)


def message_row(msg, seen: tuple[str, ...] = ()) -> dict:
    """A message as a dict of native Python values matching ``message_struct`` (unset messages: None)."""
    desc = msg.DESCRIPTOR
    seen = (*seen, desc.full_name)
    out = {}
    for f in desc.fields:
        v = getattr(msg, f.name)
        if _is_map(f):
            vf = f.message_type.fields_by_name["value"]
            out[f.name] = [{"key": k, "value": _value(vf, v[k], seen)} for k in sorted(v)]
        elif f.is_repeated:
            out[f.name] = [_value(f, x, seen) for x in v]
        elif f.message_type is not None and not msg.HasField(f.name):
            out[f.name] = None
        else:
            out[f.name] = _value(f, v, seen)
    return out


def _meta_name(name: str, payload: Descriptor) -> str:
    # a payload field of the same name wins; ours moves aside rather than overwrite it
    return f"matrix_{name}" if name in payload.fields_by_name else name


def export_schema(payload: Descriptor, *, failed: bool) -> pa.Schema:
    fields = list(message_struct(payload))
    meta = [*META_FIELDS, "error"] if failed else META_FIELDS
    for name in meta:
        f = _ENVELOPE.fields_by_name[name]
        fields.append(pa.field(_meta_name(name, payload), _field_type(f, ()), nullable=name == "error"))
    return pa.schema(fields)


def export_row(task: task_pb2.Task, payload_msg, *, failed: bool) -> dict:
    row = message_row(payload_msg)
    for name in ([*META_FIELDS, "error"] if failed else META_FIELDS):
        # only these fields: the envelope's payload (an Any) may name a type the default pool lacks
        f = _ENVELOPE.fields_by_name[name]
        unset = f.message_type is not None and not task.HasField(name)
        row[_meta_name(name, payload_msg.DESCRIPTOR)] = None if unset else _value(f, getattr(task, name), ())
    return row


def write_parquet(path: Path, schema: pa.Schema, rows: Iterable[dict], batch: int = 5000) -> int:
    n = 0
    with pq.ParquetWriter(path, schema) as w:
        for chunk in _batches(rows, batch):
            w.write_table(pa.Table.from_pylist(chunk, schema=schema))
            n += len(chunk)
        if n == 0:
            w.write_table(schema.empty_table())
    return n


def _batches(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    buf: list[dict] = []
    for r in rows:
        buf.append(r)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf
