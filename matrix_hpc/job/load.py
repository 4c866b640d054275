"""Load a job file: validate it, resolve its paths, compile its protos, check its agents.

Everything that can be checked before a run starts is checked here, and every problem is
reported with the job file, the line and the field (``JobFileError``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from pydantic import ValidationError

from matrix_hpc.job.agents import resolve_agent, resolve_ref
from matrix_hpc.job.dataset import count_rows
from matrix_hpc.job.dataset_checks import check_columns, dataset_digest
from matrix_hpc.job.selection import Selection, read_selection
from matrix_hpc.job.spec import JobSpec
from matrix_hpc.job.yamlpos import JobFileError, YamlWithLines
from matrix_hpc.owner_only import private_folder
from matrix_hpc.protogen import ProtoCompileError, compile_protos, pool_from_descriptor_set
from matrix_hpc.rundir import RunDir
from matrix_hpc.services import spec_class

__all__ = ["Job", "JobFileError", "load_job"]


@dataclass
class Job:
    """A validated job, ready to run; picklable so actors on any node get the same view."""

    spec: JobSpec
    path: Path
    yaml_text: str
    descriptor_set: bytes  # FileDescriptorSet of the payload protos, imports included
    generated: dict[str, str]  # generated Python module file name -> source
    dataset_path: Path
    run_dir: Path
    fingerprint: dict[str, str] = field(default_factory=dict)
    unfilled_fields: list[str] = field(default_factory=list)  # payload fields no dataset column fills
    rows: Selection | None = None  # a rerun's (row index, trial) pairs (job/selection.py); None: all

    def task_count(self) -> int:
        """The tasks of this run: every row times ``trials``, or a rerun's selected rows."""
        if self.rows is not None:
            return len(self.rows)
        return count_rows(self.dataset_path, self.spec.dataset.limit) * self.spec.dataset.trials

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def payload_type(self) -> str:
        return self.spec.payload.type

    def import_paths(self, generated_root: Path | None = None) -> list[str]:
        """sys.path entries a process needs to import this job's agents and payload modules; the
        generated modules are written under ``generated_root`` (default: the run directory's)."""
        root = generated_root or RunDir(self.run_dir).generated
        return [str(materialize_generated(self.generated, root)), str(self.dir)]


def load_job(path: str | Path, *, run_dir: str | Path | None = None) -> Job:
    """Validate ``path`` (a job.yaml) and everything it names; raise JobFileError if anything is off."""
    path = Path(path).resolve()
    if not path.is_file():
        raise JobFileError(f"{path}: no such job file")
    text = path.read_text()
    doc = YamlWithLines(text, str(path))
    if not isinstance(doc.data, dict):
        raise JobFileError(f"{doc.where(())}: the job file must be a mapping of keys")
    try:
        spec = JobSpec.model_validate(doc.data)
    except ValidationError as e:
        raise JobFileError("\n".join(_format_error(doc, err) for err in e.errors())) from None

    job_dir = path.parent
    dataset_path = _existing(doc, ("dataset", "path"), job_dir / spec.dataset.path, "dataset file")
    descriptor_set, generated = _compile_payload(doc, spec, job_dir)
    desc = _check_payload_mapping(doc, spec, descriptor_set)
    unfilled = check_columns(doc, spec, dataset_path, desc)
    _check_services(doc, spec)
    out = Path(run_dir) if run_dir else _output_dir(doc, spec, job_dir)
    job = Job(spec, path, text, descriptor_set, generated, dataset_path, out.resolve(), unfilled_fields=unfilled,
              rows=read_selection(out.resolve()))
    _check_agents(doc, job)
    job.fingerprint = fingerprint(job, dataset_digest(doc, spec, dataset_path, job.run_dir))
    return job


def _output_dir(doc: YamlWithLines, spec: JobSpec, job_dir: Path) -> Path:
    """``run.output_dir`` resolved against the job folder; refused if it cannot be made there: a job
    copied elsewhere keeps an ``../../runs`` that may now point at a folder of another user (``/home``)."""
    out = (job_dir / spec.run.output_dir.format(job=spec.name)).resolve()
    existing = out
    while not os.path.exists(existing):  # False, not PermissionError, inside a folder we cannot enter
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK) or existing == out:
        return out
    outside = "" if out.is_relative_to(job_dir) else f", outside the job folder {job_dir},"
    raise JobFileError(
        f"{doc.where(('run', 'output_dir'))}: {spec.run.output_dir!r} is {out}{outside} and cannot be made there "
        f"({existing} is not a folder this user can write to); give an output_dir inside the job folder "
        "(e.g. runs/{job}) or pass -o RUN_DIR")


def _format_error(doc: YamlWithLines, err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = f"unknown key {loc[-1]!r}"
    elif err["type"] == "missing":
        msg = f"missing required key {loc[-1]!r}"
    return f"{doc.where(loc)}: {msg}"


def _existing(doc: YamlWithLines, loc: tuple, p: Path, what: str) -> Path:
    if not p.exists():
        raise JobFileError(f"{doc.where(loc)}: {what} {p} does not exist")
    return p.resolve()


def _compile_payload(doc: YamlWithLines, spec: JobSpec, job_dir: Path) -> tuple[bytes, dict[str, str]]:
    files = [
        _existing(doc, ("payload", "proto", i), job_dir / f, "proto file") for i, f in enumerate(spec.payload.proto)
    ]
    for i, f in enumerate(files):
        if not f.is_relative_to(job_dir.resolve()):
            raise JobFileError(f"{doc.where(('payload', 'proto', i))}: proto files must be inside the job folder")
    with tempfile.TemporaryDirectory(prefix="matrix-protoc-") as tmp:
        out = Path(tmp)
        desc = out / "payload.desc"
        try:
            compile_protos(job_dir, files, out / "gen", descriptor_set=desc)
        except ProtoCompileError as e:
            raise JobFileError(f"{doc.where(('payload', 'proto'))}: the payload proto does not compile:\n{e}") from None
        generated = {p.name: p.read_text() for p in (out / "gen").rglob("*_pb2.py")}
        return desc.read_bytes(), generated


def _check_payload_mapping(doc: YamlWithLines, spec: JobSpec, descriptor_set: bytes):
    """The payload's message descriptor; refuses a type the protos lack or a from_row field it lacks."""
    pool = pool_from_descriptor_set(descriptor_set)
    try:
        desc = pool.FindMessageTypeByName(spec.payload.type)
    except KeyError:
        fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
        known = [
            f"{f.package}.{m.name}" if f.package else m.name
            for f in fds.file
            if not f.name.startswith("google/")
            for m in f.message_type
        ]
        raise JobFileError(
            f"{doc.where(('payload', 'type'))}: no message {spec.payload.type!r} in the payload proto; "
            f"defined there: {', '.join(known) or 'none'}"
        ) from None
    for fname in spec.payload.from_row or {}:
        if fname not in desc.fields_by_name:
            raise JobFileError(
                f"{doc.where(('payload', 'from_row', fname))}: {spec.payload.type} has no field {fname!r}; "
                f"its fields: {', '.join(desc.fields_by_name)}"
            )
    return desc


def _check_services(doc: YamlWithLines, spec: JobSpec) -> None:
    for kind, entries in spec.services.items():
        cls = spec_class(kind)
        for name, settings in (entries or {}).items():
            try:
                cls.model_validate(settings or {})
            except ValidationError as e:
                errs = [_format_error(doc, {**err, "loc": ("services", kind, name, *err["loc"])}) for err in e.errors()]
                raise JobFileError("\n".join(errs)) from None


def _check_agents(doc: YamlWithLines, job: Job) -> None:
    with tempfile.TemporaryDirectory(prefix="matrix-hpc-check-") as scratch, \
            job_imports(job, generated_root=Path(scratch)):
        for role, rs in job.spec.roles.items():
            try:
                resolve_agent(rs.agent, instantiate=False)
            except Exception as e:  # noqa: BLE001 - any import-time failure is the job's problem to see
                raise JobFileError(
                    f"{doc.where(('roles', role, 'agent'))}: cannot load agent {rs.agent!r}: {type(e).__name__}: {e}"
                ) from None
        if job.spec.payload.builder:
            try:
                resolve_ref(job.spec.payload.builder)
            except Exception as e:  # noqa: BLE001 - any import-time failure is the job's problem to see
                raise JobFileError(
                    f"{doc.where(('payload', 'builder'))}: cannot load {job.spec.payload.builder!r}: "
                    f"{type(e).__name__}: {e}"
                ) from None


class job_imports:
    """Put a job's folders on sys.path and, on exit, forget the modules imported from them.

    The driver may load several jobs (tests do) whose agent modules share names; forgetting
    them keeps one job's ``agents`` module from answering for another's.
    """

    def __init__(self, job: Job, generated_root: Path | None = None):
        self.paths = job.import_paths(generated_root)

    def __enter__(self) -> None:
        self.before = set(sys.modules)
        sys.path[:0] = self.paths

    def __exit__(self, *exc: object) -> None:
        for p in self.paths:
            sys.path.remove(p)
        for name in set(sys.modules) - self.before:
            f = getattr(sys.modules[name], "__file__", None) or ""
            if any(f.startswith(p) for p in self.paths):
                del sys.modules[name]


def materialize_generated(generated: dict[str, str], root: Path) -> Path:
    """Write generated payload modules once per content under ``root``; return their folder.

    ``root`` must be a private folder of this user (created 0700 if missing): code imported from a
    folder someone else can write to would run as us. Raises CredentialError otherwise.
    """
    digest = hashlib.sha256(repr(sorted(generated.items())).encode()).hexdigest()[:16]
    target = private_folder(root) / digest
    if not target.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=root))
        for name, src in generated.items():
            (tmp / name).write_text(src)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _sha(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def fingerprint(job: Job, dataset_digest: str) -> dict[str, str]:
    """What changes results: the job spec, the agent code, the payload protos, the dataset's content."""
    code = sorted(p for p in job.dir.rglob("*.py")
                  if "runs" not in p.relative_to(job.dir).parts and not p.is_relative_to(job.run_dir))
    protos = sorted(job.dir.rglob("*.proto"))
    return {
        "job_spec": _sha(job.yaml_text.encode()),
        "agent_code": _sha(*(p.relative_to(job.dir).as_posix().encode() + p.read_bytes() for p in code)),
        "proto": _sha(*(p.read_bytes() for p in protos)),
        "dataset": dataset_digest,
    }
