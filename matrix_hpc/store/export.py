"""Export committed results as JSON Lines or Parquet, ready for Hugging Face ``datasets``.

Payloads are decoded with the descriptor set stored in the run directory (a private
DescriptorPool), so exporting never imports the job's code and works on any machine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import json_format, message_factory

from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.protogen import pool_from_descriptor_set
from matrix_hpc.store._durable import TMP_SUFFIX
from matrix_hpc.store.parquet import META_FIELDS, export_row, export_schema, write_parquet
from matrix_hpc.store.run_store import DONE, FAILED, RunStore, StoreError

FORMATS = ("jsonl", "parquet")


class PayloadDecoder:
    """Decodes ``google.protobuf.Any`` payloads with message classes built from a descriptor set."""

    def __init__(self, descriptor_set: bytes, payload_type: str):
        try:
            self.pool = pool_from_descriptor_set(descriptor_set)
        except Exception as e:  # noqa: BLE001 - protobuf's parse and pool errors have no common type
            raise StoreError(f"payload.desc is not a loadable FileDescriptorSet: {e}") from e
        self.payload_type = payload_type
        self._classes: dict[str, type] = {}

    def message_class(self, full_name: str):
        cls = self._classes.get(full_name)
        if cls is None:
            try:
                desc = self.pool.FindMessageTypeByName(full_name)
            except KeyError as e:
                raise StoreError(f"payload type {full_name!r} is not in payload.desc") from e
            cls = self._classes[full_name] = message_factory.GetMessageClass(desc)
        return cls

    def to_dict(self, msg) -> dict:
        return json_format.MessageToDict(
            msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True,
            descriptor_pool=self.pool, unquote_int64_if_possible=True)

    def payload(self, task: task_pb2.Task):
        """The task's payload message (an empty one of the run's type if the task has none)."""
        if not task.HasField("payload"):
            return self.message_class(self.payload_type)()
        type_name = task.payload.type_url.rsplit("/", 1)[-1] or self.payload_type
        msg = self.message_class(type_name)()
        msg.ParseFromString(task.payload.value)
        return msg


def _tasks(store: RunStore, dec: PayloadDecoder, failed: bool) -> Iterator[tuple[task_pb2.Task, object]]:
    for raw in store.iter_results(status=FAILED if failed else DONE):
        task = task_pb2.Task.FromString(raw)
        yield task, dec.payload(task)


def _json_rows(store: RunStore, dec: PayloadDecoder, failed: bool) -> Iterator[dict]:
    for task, payload in _tasks(store, dec, failed):
        row = dec.to_dict(payload)
        meta = {name: getattr(task, name) for name in META_FIELDS}
        if failed:
            meta["error"] = json_format.MessageToDict(task.error, preserving_proto_field_name=True,
                                                      always_print_fields_with_no_presence=True)
        for k, v in meta.items():
            # a payload field of the same name wins; ours moves aside rather than overwrite it
            row["matrix_" + k if k in row else k] = v
        yield row


def export(run_dir: Path, out: Path, *, format: str = "jsonl", failed: bool = False) -> int:
    """Write the committed done (or, with ``failed``, failed) rows of a run to ``out``.

    Each row is the payload as a JSON object (proto field names, defaults included) plus
    task_id, row_id, row_index, trial, retries (and error when ``failed``). The file appears under its
    final name only once complete. Returns the number of rows written.
    """
    if format not in FORMATS:
        raise StoreError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    store = RunStore.open(Path(run_dir))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        n = _write_jsonl(store, failed, tmp) if format == "jsonl" else _write_parquet(store, failed, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _write_jsonl(store: RunStore, failed: bool, path: Path) -> int:
    n = 0
    dec = PayloadDecoder(store.descriptor_set, store.payload_type)
    with open(path, "w", encoding="utf-8") as f:
        for row in _json_rows(store, dec, failed):
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


def _write_parquet(store: RunStore, failed: bool, path: Path) -> int:
    dec = PayloadDecoder(store.descriptor_set, store.payload_type)
    schema = export_schema(dec.message_class(store.payload_type).DESCRIPTOR, failed=failed)
    rows = (export_row(task, payload, failed=failed) for task, payload in _tasks(store, dec, failed))
    return write_parquet(path, schema, rows)
