"""The README and docs/ say only what the code does: every ``recserve ...`` command line they
show parses with the real CLI parser (``recserve.cli.main.build_parser``; parsed, never run),
every relative link and every repository path they quote points to an existing file (and
heading, for ``#anchors``), and every ``make X`` they name is a Makefile target.

Command lines with placeholders (``<...>``, ``[...]``, ``...``, ``a|b``, UPPER-CASE words such as
PACKAGE or N) cannot be parsed as written: they are skipped, listed by name, and kept few.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *(ROOT / d / "README.md" for d in ("loadtest", "serving/fading", "deploy/gpu-host"))]  # packages' own

# How the docs call the CLI: the console script, or the module.
RECSERVE = re.compile(r"^(?:\S*/)?recserve$")
PYTHON = re.compile(r"^(?:\S*/)?python3?$")
# Shell words that may precede the command: VAR=value, nice -n N, time, nohup, env.
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# A word that stands for a value the reader fills in: <x>, [--flag], a|b, ..., PACKAGE, N, ...
PLACEHOLDER = re.compile(r"<[^>]*>|\[|\]|\.\.\.|…|^[A-Z][A-Z0-9_]*$|^[a-z][\w-]*\|[a-z][\w|-]*$")
# Repository paths quoted in `code`: a top-level folder of the project, then a path.
TOP_DIRS = ("benchmarks", "deploy", "docs", "kernels", "loadtest", "protos", "recserve", "serving",
            "sharding", "tests")
REPO_PATH = re.compile(r"^(?:%s)/[\w./-]*$" % "|".join(TOP_DIRS))
SCRIPT = re.compile(r"^(?:%s)/[\w/.-]+\.(?:py|sh|yaml|yml|json)$" % "|".join(TOP_DIRS))


@dataclass(frozen=True)
class Shown:
    """One thing a doc shows: its text, and where (file and line)."""

    text: str
    doc: Path
    line: int

    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def fenced_lines(doc: Path) -> list[Shown]:
    """Lines inside ``` blocks (not ```python ones), backslash continuations joined, a
    leading ``$ `` prompt dropped."""
    out: list[Shown] = []
    fence: str | None = None
    pending, start = "", 0
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip()
            continue
        if fence is None or fence == "python":
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = (pending + stripped).strip()
        pending = ""
        out.append(Shown(text[2:] if text.startswith("$ ") else text, doc, start))
    return out


def inline_spans(doc: Path) -> list[Shown]:
    """Every `code span` outside fenced blocks; a span may run over a line break within its
    paragraph (the break reads as a space)."""
    out: list[Shown] = []
    in_fence = False
    paragraph: list[tuple[int, str]] = []

    def flush() -> None:
        text = " ".join(line for _, line in paragraph)
        starts = [0]
        for _, line in paragraph:
            starts.append(starts[-1] + len(line) + 1)
        for match in re.finditer(r"`([^`]+)`", text):
            index = max(i for i, start in enumerate(starts[:-1]) if start <= match.start())
            out.append(Shown(match.group(1).strip(), doc, paragraph[index][0]))
        paragraph.clear()

    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            flush()
            in_fence = not in_fence
        elif not in_fence:
            if line.strip():
                paragraph.append((number, line.strip()))
            else:
                flush()
    flush()
    return out


def shell_commands(shown: Shown) -> list[list[str]]:
    """The simple commands of one shell line (split at ; && || | &), comments dropped; a line
    shlex cannot split (an unbalanced quote in prose) gives none."""
    lexer = shlex.shlex(shown.text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        words = list(lexer)
    except ValueError:
        return []
    commands, current = [], []
    for word in words:
        if word and set(word) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [c for c in commands + [current] if c]


def recserve_argv(words: list[str]) -> list[str] | None:
    """The arguments after ``recserve`` (or ``python -m recserve.cli``), or None if the
    command is something else."""
    i = 0
    while i < len(words):  # prefixes: VAR=value, nice -n N, time, nohup, env
        if ASSIGNMENT.match(words[i]) or words[i] in ("time", "nohup", "env", "exec"):
            i += 1
        elif words[i] == "nice":
            i += 3 if i + 1 < len(words) and words[i + 1] == "-n" else 1
        else:
            break
    words = words[i:]
    if words and RECSERVE.match(words[0]):
        return words[1:]
    if len(words) >= 3 and PYTHON.match(words[0]) and words[1:3] == ["-m", "recserve.cli"]:
        return words[3:]
    return None


@dataclass(frozen=True)
class Command:
    """A recserve command a doc shows: a line of a code block (to be pasted as it is) or a
    `span` in prose, which may name a command without its required arguments
    (`recserve deploy`), but never an unknown command, flag or value."""

    shown: Shown
    argv: list[str]
    in_prose: bool


def recserve_lines() -> list[Command]:
    """Every recserve command the docs show, in code blocks and in inline code; program output
    in a code block (``recserve plan: cannot plan ...``) is not a command."""
    found = []
    for doc in DOCS:
        for in_prose, lines in ((False, fenced_lines(doc)), (True, inline_spans(doc))):
            for shown in lines:
                for words in shell_commands(shown):
                    argv = recserve_argv(words)
                    # a bare `recserve` names the tool; 'recserve plan: ...' or 'recserve teacher
                    # score: ...' is what it printed (a word of the command path ends with ':')
                    if argv and not any(w.endswith(":") for w in argv[:2] if not w.startswith("-")):
                        found.append(Command(shown, argv, in_prose))
    return found


def is_placeholder(argv: list[str]) -> bool:
    return any(PLACEHOLDER.search(word) for word in argv)


def parse_error(argv: list[str]) -> str | None:
    """What the real parser says about ``argv`` (None: it parses)."""
    import contextlib
    import io

    from recserve.cli.main import build_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):  # --help exits 0
            return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {e.code}"
    return None


def test_docs_show_recserve_commands():
    """The docs are not empty of commands (so the next test cannot pass by finding none)."""
    commands = recserve_lines()
    runnable = [c for c in commands if not is_placeholder(c.argv)]
    assert len([c for c in runnable if not c.in_prose]) >= 30, f"only {len(runnable)} command lines in {len(DOCS)} docs"
    # placeholders are the exception: a reader must be able to paste most lines as they are
    skipped = [f"{c.shown.where()}: {c.shown.text}" for c in commands if is_placeholder(c.argv)]
    assert len(skipped) <= len(runnable) // 5, "too many command lines with placeholders:\n" + "\n".join(skipped)


def test_every_recserve_command_parses():
    failures = []
    for c in recserve_lines():
        error = None if is_placeholder(c.argv) else parse_error(c.argv)
        # prose may name a command or a flag without its values: `recserve deploy`, `--drop-features`
        if error and not (c.in_prose and re.search(r"arguments are required|expected (one|at least one) argument", error)):
            failures.append(f"{c.shown.where()}: {shlex.join(['recserve', *c.argv])}\n    {error}")
    assert not failures, "command lines the CLI rejects:\n" + "\n".join(failures)


def test_parse_check_catches_a_broken_line(tmp_path):
    """The checker itself: a misspelt flag and an unknown command are reported, a good line is not."""
    doc = tmp_path / "broken.md"
    doc.write_text("```\n.venv/bin/recserve plan --workload tiny --strategy load --shardz 2\n"
                   "recserve plan --workload tiny --strategy load --shards 2 && recserve frobnicate\n```\n")
    argvs = [recserve_argv(words) for shown in fenced_lines(doc) for words in shell_commands(shown)]
    errors = [parse_error(argv) for argv in argvs]
    assert "unrecognized arguments: --shardz 2" in errors[0]
    assert errors[1] is None
    assert "invalid choice: 'frobnicate'" in errors[2]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"`|\*\*?", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    in_fence, out = False, set()
    for line in doc.read_text().splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            out.add(_slug(line.lstrip("#")))
    return out


def links(doc: Path) -> list[Shown]:
    """Targets of [text](target) and ![alt](target) outside code."""
    out, in_fence = [], False
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            in_fence = not in_fence
            continue
        if not in_fence:
            line = re.sub(r"`[^`]*`", "", line)
            out += [Shown(target, doc, number) for target in re.findall(r"\]\(([^)\s]+)\)", line)]
    return out


def broken_link(link: Shown) -> str | None:
    target = link.text
    if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
        return None
    path, _, anchor = target.partition("#")
    file = (link.doc.parent / path).resolve() if path else link.doc
    if not file.exists():
        return f"{target}: no such file"
    if anchor and file.suffix == ".md" and anchor not in anchors(file):
        return f"{target}: no heading '#{anchor}' in {file.name}"
    return None


def test_every_relative_link_exists():
    found = [link for doc in DOCS for link in links(doc)]
    assert len(found) >= 10
    failures = [f"{link.where()}: {error}" for link in found for error in [broken_link(link)] if error]
    assert not failures, "broken links:\n" + "\n".join(failures)


def test_link_check_catches_a_broken_link(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Top\n[ok](doc.md#top) [gone](missing.md) [anchor](doc.md#nowhere) [web](https://x.org)\n")
    errors = [broken_link(link) for link in links(doc)]
    assert errors[0] is None and errors[3] is None
    assert "no such file" in errors[1] and "no heading '#nowhere'" in errors[2]


def quoted_paths() -> list[Shown]:
    """Repository paths the docs quote in `code` or in command lines (scripts and configs)."""
    out = []
    for doc in DOCS:
        for shown in inline_spans(doc):
            if REPO_PATH.match(shown.text) and not PLACEHOLDER.search(shown.text):
                out.append(shown)
        for shown in fenced_lines(doc):
            for words in shell_commands(shown):
                out += [Shown(w, doc, shown.line) for w in words if SCRIPT.match(w)]
    return out


def test_every_quoted_repository_path_exists():
    found = quoted_paths()
    assert len(found) >= 30
    missing = [f"{p.where()}: {p.text}" for p in found if not (ROOT / p.text.split("::")[0]).exists()]
    assert not missing, "paths the docs name that are not in the repository:\n" + "\n".join(missing)


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def named_make_targets() -> list[Shown]:
    out = []
    for doc in DOCS:
        for shown in fenced_lines(doc) + inline_spans(doc):
            for words in shell_commands(shown):
                words = [w for w in words if not ASSIGNMENT.match(w)]
                if len(words) >= 2 and words[0] == "make":
                    out += [Shown(w, doc, shown.line) for w in words[1:] if not w.startswith("-")]
    return out


def test_every_named_make_target_exists():
    named, targets = named_make_targets(), make_targets()
    assert {"setup", "serve", "test", "lint"} <= targets
    assert {s.text for s in named} >= {"serve", "test"}  # the README starts with them
    unknown = [f"{s.where()}: make {s.text}" for s in named if s.text not in targets]
    assert not unknown, "make targets the Makefile does not have:\n" + "\n".join(unknown)


@pytest.mark.parametrize("line, expected", [
    ("recserve serve PACKAGE --monolith", True),
    ("recserve export --workload tiny --out <dir>", True),
    ("recserve serve --transport reference|grpc", True),
    ("recserve plan --workload tiny --strategy load --shards 2 --out plan.json", False),
])
def test_placeholder_lines_are_recognised(line, expected):
    assert is_placeholder(shlex.split(line)[1:]) is expected
