"""Every code block of README.md and docs/*.md runs as written (issue 27).

Each page runs in a fresh home (``KACHERY_TASKS_HOME``) and a fresh working directory:

- its ```python blocks run in page order in one interpreter, as one script whose line numbers are
  the page's (so a traceback points into the Markdown), and a failure names the page, the block's
  first line and the output;
- a ```python block marked ``<!-- docs-test: script: NAME.py -->`` is the file the page tells the
  reader to save: it is written to NAME.py and run as ``python NAME.py`` in its own process, after
  the page's other Python blocks;
- ```bash / ```console blocks: their ``kachery …`` commands (``$ kachery …`` in a console block, where
  the lines without ``$`` are output), ``python -m kachery_tasks.cli …`` and ``python NAME.py`` of a
  script the page made run in page order in one shell per page (a variable set in one block is
  there in the next), in the same home, after the Python blocks; each must exit as the page implies:
  0, unless the output shown after it is an error (``kachery: error`` is 1, a usage error 2). Other
  lines (``pip install``, ``echo $?``) are not run.

Markers, HTML comments on the line right above a block's fence (invisible on rendered pages):

- ``<!-- docs-test: skip: REASON -->``: the block cannot run as written on a fresh machine;
- ``<!-- docs-test: setup: PYTHON -->``: one line of Python run (in the page's interpreter for a
  Python block, in a ``python -c`` process in the working directory for a shell block) before it,
  to make what the reader brings (``rec.npy``);
- ``<!-- docs-test: script: NAME.py -->``: see above.

Run alone with ``pytest -m docs``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHON_LANGS = {"python", "py"}
SHELL_LANGS = {"bash", "console", "sh", "shell"}
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(skip|setup|script):\s*(.*?)\s*-->\s*$")
CLI = "kachery_tasks.cli"
FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)\s*$")

pytestmark = pytest.mark.docs


@dataclass
class Block:
    """One fenced code block of a page."""

    page: Path
    lang: str
    line: int           # 1-based line of its first code line (the line after the fence)
    lines: list[str]    # its code, dedented by the fence's indentation
    skip: str | None = None
    setup: str | None = None
    script: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def parse_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, with the docs-test marker on the line above each fence."""
    text = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(text):
        m = FENCE.match(text[i])
        if not m:
            i += 1
            continue
        indent, ticks, lang = m.group(1), m.group(2), m.group(3).lower()
        marker = MARKER.match(text[i - 1]) if i > 0 else None
        j = i + 1
        while j < len(text) and not (text[j].strip().startswith(ticks) and text[j].strip().strip("`") == ""):
            j += 1
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in text[i + 1:j]]
        block = Block(page, lang, i + 2, body)
        if marker:
            setattr(block, marker.group(1), marker.group(2))
        blocks.append(block)
        i = j + 1
    return blocks


def page_script(page: Path, blocks: list[Block]) -> str:
    """The page's Python blocks as one script in which each code line keeps its page line number.

    Every other line is blank, except the line of each block's fence, which becomes a call that
    records the block (for the failure message), preceded by the block's setup line if it has one.
    """
    lines = [""] * len(page.read_text(encoding="utf-8").splitlines())
    for b in blocks:
        setup = f"{b.setup}; " if b.setup else ""
        lines[b.line - 2] = f"{setup}__import__('sys').stderr.write('@@docs-test block {b.line}\\n')"
        for k, code in enumerate(b.lines):
            lines[b.line - 1 + k] = code
    return "\n".join(lines) + "\n"


def failing_block(stderr: str, blocks: list[Block]) -> Block | None:
    started = re.findall(r"@@docs-test block (\d+)", stderr)
    if not started:
        return None
    line = int(started[-1])
    return next(b for b in blocks if b.line == line)


def is_python_block(b: Block) -> bool:
    return b.lang in PYTHON_LANGS


def is_shell_block(b: Block) -> bool:
    return b.lang in SHELL_LANGS


def command_words(command: str) -> list[str]:
    """The command's words after its leading ``VAR=value`` assignments (``URI=$(kachery …)`` gives kachery …)."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return []
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        name, _, value = words[0].partition("=")
        if value.startswith("$("):
            return [value[2:], *words[1:]]
        words = words[1:]
    return words


def shell_commands(b: Block, scripts: set[str]) -> list[tuple[int, str, int]]:
    """(page line, command, expected exit status) of each command of a shell block that is run.

    In a console block a command is a line starting with ``$ ``, and the lines after it up to the
    next command are its output; in a bash block every line is a command. Only ``kachery`` commands
    and ``python NAME.py`` of a script the page made are run; ``# comments`` stay, bash drops them.
    """
    console = any(line.startswith("$ ") for line in b.lines)
    commands: list[tuple[int, str, list[str]]] = []
    for k, line in enumerate(b.lines):
        if console:
            if line.startswith("$ "):
                commands.append((b.line + k, line[2:], []))
            elif commands:
                commands[-1][2].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            commands.append((b.line + k, line, []))
    run = []
    for lineno, command, output in commands:
        words = command_words(command)
        if words[:1] == ["kachery"] or (words[:1] == ["python"] and (words[1:2] and words[1] in scripts
                                                                     or words[1:3] == ["-m", CLI])):
            run.append((lineno, command, expected_status(output)))
    return run


def expected_status(output: list[str]) -> int:
    """The exit status a command's shown output implies: 1 for a one-line error, 2 for a usage error."""
    if any(line.startswith("Usage:") for line in output):
        return 2
    if any(line.startswith("kachery: error:") for line in output):
        return 1
    return 0


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, errors="replace", timeout=timeout,
                          stdin=subprocess.DEVNULL)


def page_env(env: dict[str, str], home: Path) -> dict[str, str]:
    """The conftest environment with this page's home, and the venv's ``kachery``/``python`` first on PATH."""
    bindir = str(Path(sys.executable).parent)
    return {**env, "KACHERY_TASKS_HOME": str(home), "PATH": os.pathsep.join([bindir, env.get("PATH", "")]),
            "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}


def section(output: str, lineno: int) -> str:
    """What the shell command of page line ``lineno`` wrote, between its markers (all, if they are missing)."""
    m = re.search(rf"@@docs-test command {lineno}\n(.*?)@@docs-test status {lineno} ", output, re.S)
    return m.group(1) if m else output


def output_of(proc: subprocess.CompletedProcess) -> str:
    return f"--- stdout ---\n{proc.stdout}--- stderr ---\n{proc.stderr}"


def run_page(page: Path, env: dict[str, str], tmp: Path) -> None:
    blocks = parse_blocks(page)
    home, cwd = tmp / "home", tmp / "work"
    home.mkdir()
    cwd.mkdir()
    env = page_env(env, home)

    python = [b for b in blocks if is_python_block(b) and not b.skip]
    main = [b for b in python if not b.script]
    scripts = [b for b in python if b.script]
    if main:
        script = cwd / (page.name.replace(".", "_") + ".py")
        text = page_script(page, main)
        script.write_text(text, encoding="utf-8")
        proc = run([sys.executable, script.name], env, cwd)
        if proc.returncode != 0:
            b = failing_block(proc.stderr, main)
            where = b.where if b else str(page.relative_to(REPO))
            pytest.fail(f"{where}: the Python block starting here raised (the traceback's line numbers "
                        f"are the page's):\n{output_of(proc)}",
                        pytrace=False)
    for b in scripts:
        (cwd / b.script).write_text("\n".join(b.lines) + "\n", encoding="utf-8")
    for b in scripts:
        if b.setup:
            setup = run([sys.executable, "-c", b.setup], env, cwd)
            assert setup.returncode == 0, f"{b.where}: setup failed:\n{output_of(setup)}"
        proc = run([sys.executable, b.script], env, cwd)
        if proc.returncode != 0:
            pytest.fail(f"{b.where}: python {b.script} (this block) failed:\n{output_of(proc)}", pytrace=False)

    # The shell blocks of a page run in one shell, as in the reader's terminal: a variable set in
    # one block (URI=$(kachery store …)) is there in the next.
    script_names = {b.script for b in scripts}
    lines: list[str] = []
    commands: list[tuple[int, str, int]] = []
    for b in blocks:
        if not is_shell_block(b) or b.skip:
            continue
        if b.setup:
            lines.append(f"python -c {shlex.quote(b.setup)} || echo '@@docs-test setup {b.line} failed' >&2")
        for lineno, command, expected in shell_commands(b, script_names):
            commands.append((lineno, command, expected))
            lines.append(f"echo '@@docs-test command {lineno}'; echo '@@docs-test command {lineno}' >&2")
            lines.append(command)
            lines.append(f"echo \"@@docs-test status {lineno} $?\" | tee /dev/stderr")
    if not commands:
        return
    proc = run(["bash", "-c", "\n".join(lines)], env, cwd)
    failed_setup = re.search(r"@@docs-test setup (\d+) failed", proc.stderr)
    if failed_setup:
        pytest.fail(f"{page.relative_to(REPO)}:{failed_setup.group(1)}: the setup of the block starting here "
                    f"failed:\n{output_of(proc)}", pytrace=False)
    statuses = {int(n): int(s) for n, s in re.findall(r"@@docs-test status (\d+) (\d+)", proc.stderr)}
    for lineno, command, expected in commands:
        got = statuses.get(lineno)
        if got != expected:
            out, err = (section(text, lineno) for text in (proc.stdout, proc.stderr))
            pytest.fail(f"{page.relative_to(REPO)}:{lineno}: `{command}` exited {got}; the page implies "
                        f"{expected}:\n--- stdout ---\n{out}--- stderr ---\n{err}", pytrace=False)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_page_examples_run(page: Path, env: dict[str, str], tmp_path: Path) -> None:
    """Every block of the page that is not marked skip runs as written (see the module docstring)."""
    run_page(page, env, tmp_path)


def test_every_skip_has_a_reason() -> None:
    """A skip without a reason would hide a broken example; each one says why in a few words."""
    for page in PAGES:
        for b in parse_blocks(page):
            if b.skip is not None:
                assert len(b.skip.split()) >= 2, f"{b.where}: a docs-test skip needs a reason"
