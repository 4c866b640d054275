"""YAML loading that remembers where each value came from, so errors can name a line."""

from __future__ import annotations

from typing import Any

import yaml

Path_ = tuple[str | int, ...]


class YamlWithLines:
    """The parsed document plus the 1-based line of every key/value path in it."""

    def __init__(self, text: str, filename: str):
        self.filename = filename
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            # safe_load refuses tags that would construct Python objects (!!python/object ...)
            self.data: Any = yaml.safe_load(text) if node is not None else {}
        except yaml.YAMLError as e:
            raise JobFileError(_yaml_problem(e, filename)) from None
        self.lines: dict[Path_, int] = {}
        if node is not None:
            self._index(node, ())

    def _index(self, node: yaml.Node, path: Path_) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = path + (key.value,)
                self._index(value, child)
                self.lines[child] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, path + (i,))

    def line_of(self, path: Path_) -> int:
        """Line of the deepest existing prefix of ``path`` (a missing key points at its parent)."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return 1

    def where(self, path: Path_) -> str:
        field = ".".join(str(p) for p in path) or "(top level)"
        return f"{self.filename}:{self.line_of(path)}: {field}"


def _yaml_problem(e: yaml.YAMLError, filename: str) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"{filename}:{mark.line + 1}" if mark else filename
    if isinstance(e, yaml.constructor.ConstructorError):
        return f"{where}: YAML tag not allowed here: {e.problem} (job files hold plain data: no Python objects)"
    return f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}"


class JobFileError(Exception):
    """A job file problem, reported as ``file:line: field: what is wrong`` (one per line)."""
