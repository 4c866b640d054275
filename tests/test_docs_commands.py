"""Every `matrix-hpc COMMAND ... --flag` that README.md and docs/*.md show exists: each command's
`--help` is run and parsed, and each flag the docs give it must be among its options. The docs and
the command line cannot drift apart unnoticed."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from matrix_hpc.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NESTED = ("serve", "image")  # commands with sub-commands: `matrix-hpc serve llm ...`
FLAG = re.compile(r"(?<![\w/.-])(--?[a-zA-Z][\w-]*)")


def code_lines(doc: Path) -> list[str]:
    """The lines of a doc's shell code blocks, and its inline code spans that mention matrix-hpc."""
    lines, fence = [], None  # fence: the language of the code block we are in
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence in ("bash", "sh", "console", ""):
            lines.append(line)
        elif fence is None:
            lines += [code for code in line.split("`")[1::2] if "matrix-hpc " in code]
    return lines


def shown_commands() -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(where, command words, flags) of every `matrix-hpc` command line in the docs' code."""
    found = []
    for doc in DOCS:
        for line in code_lines(doc):
            for piece in line.split("matrix-hpc ")[1:]:
                piece = piece.split("#")[0].replace("\\|", "|")
                words = piece.split()
                if not words or not re.fullmatch(r"[a-z][a-z-]*", words[0]):
                    continue  # "matrix-hpc ..." in prose, not a command
                commands = [(words[0], sub) for sub in words[1].split("|")] \
                    if words[0] in NESTED and len(words) > 1 else [(words[0],)]
                for command in commands:  # `serve llm|sandbox`: both
                    found.append((f"{doc.name}: {line.strip()[:80]}", command, tuple(FLAG.findall(piece))))
    return found


def help_options(command: tuple[str, ...]) -> set[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0, command
    return set(FLAG.findall(out.getvalue()))


COMMANDS = shown_commands()


def test_the_docs_show_commands_and_flags():
    shown = {c for _, c, _ in COMMANDS}
    assert {("run",), ("resume",), ("rerun",), ("status",), ("export",), ("submit",)} <= shown, shown
    assert sum(len(flags) for _, _, flags in COMMANDS) > 20


@pytest.mark.parametrize("where, command, flags", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_each_command_and_flag_the_docs_show_exists(where, command, flags):
    options = help_options(command)
    assert set(flags) <= options, f"{where}: {sorted(set(flags) - options)} not in `matrix-hpc {' '.join(command)} --help`"


def quoted(doc: Path, start: str) -> str:
    """The inline code of ``doc`` that starts with ``start``, joined across a line break."""
    text = " ".join(doc.read_text().split())
    return next(code for code in text.split("`")[1::2] if code.startswith(start))


def test_the_typo_messages_the_docs_show_are_the_real_ones(tmp_path):
    import shutil

    from test_writing_a_job import file_blocks

    from matrix_hpc.job.load import JobFileError, load_job

    for path, text in file_blocks().items():  # the guide's job, with the typo it shows
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    job = tmp_path / "jobs/wordcount/job.yaml"
    job.write_text(job.read_text().replace('guess: {agent: "agents:guess"', 'guess: {agnet: "agents:guess"'))
    with pytest.raises(JobFileError) as e:
        load_job(job)
    shown = quoted(ROOT / "docs" / "writing-a-job.md", "job.yaml:9: roles.guess.agnet")
    assert f"{job.parent}/{shown}" in str(e.value).splitlines(), str(e.value)

    cv = tmp_path / "code_verify"  # README's misspelt column
    shutil.copytree(ROOT / "jobs" / "code_verify", cv)
    data = cv / "problems.jsonl"
    data.write_text(data.read_text().replace('"problem"', '"problm"'))
    with pytest.raises(JobFileError) as e:
        load_job(cv / "job.yaml", run_dir=tmp_path / "run")
    shown = quoted(ROOT / "README.md", "job.yaml:8: dataset.path: column 'problm'").removesuffix(" ...")
    assert str(e.value).replace(f"{cv}/", "").startswith(shown), (str(e.value), shown)
