"""The README's tour runs as printed: its blocks marked `tour`, in order, in one
fresh shell from the repository root, as a new user would type them.

```sh tour``` blocks must exit 0; in ```console tour``` blocks each `$ command`
(with `\\` continuations) must print exactly the lines shown under it, but
for decision ids, which are new each time.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^( *)```(sh|console) tour\n(.*?)^\1```", re.S | re.M)
DECISION_ID = re.compile(r"\b[0-9a-f]{16,32}\b")

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(300)]


@dataclass
class Step:
    command: str
    expected: list[str] | None  # None: a `sh` line, judged by its exit code


def steps(markdown: str) -> list[Step]:
    out: list[Step] = []
    for m in FENCE.finditer(markdown):
        indent, kind, body = m.group(1), m.group(2), m.group(3)
        lines = [line.removeprefix(indent) for line in body.splitlines()]
        if kind == "sh":
            out += [Step(line, None) for line in lines if line.strip()]
            continue
        for line in lines:
            if line.startswith("$ "):
                out.append(Step(line[2:], []))
            elif out and out[-1].command.endswith("\\"):
                out[-1].command += "\n" + line
            else:
                assert out and out[-1].expected is not None, f"output before a command: {line}"
                out[-1].expected.append(line)
    return out


def script(all_steps: list[Step]) -> str:
    parts = []
    for i, step in enumerate(all_steps):
        # A group, not a subshell: `. .venv/bin/activate` must last; the command
        # on its own lines, so that a trailing `# comment` comments out nothing more.
        parts.append(f"echo '@@begin {i}'\n{{\n{step.command}\n}} 2>&1\necho \"@@end {i} $?\"")
    return "\n".join(parts) + "\n"


def test_the_tour_has_runnable_blocks() -> None:
    """The markers are there: venv, lint, check and the demo are all in the tour."""
    commands = " ".join(s.command for s in steps(README.read_text()))
    for needed in ("make venv", ". .venv/bin/activate", "lint examples", "check", "demo"):
        assert needed in commands, needed


def test_readme_tour_runs_as_printed() -> None:
    """Every marked block, top to bottom, in one fresh shell: sh lines exit 0, console
    commands print what the README shows."""
    up_to_date = subprocess.run(["make", "-q", "venv"], cwd=ROOT, check=False)
    if up_to_date.returncode != 0:
        pytest.fail("the venv is stale (pyproject.toml or requirements.lock changed): make venv")
    tour = steps(README.read_text())
    done = subprocess.run(
        ["bash", "--noprofile", "--norc"], input=script(tour), capture_output=True, text=True,
        cwd=ROOT, timeout=240, check=False,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()), "LANG": "C.UTF-8"},
    )  # fmt: skip
    blocks = re.findall(r"^@@begin (\d+)\n(.*?)^@@end \1 (\d+)$", done.stdout, re.S | re.M)
    assert len(blocks) == len(tour), done.stdout[-3000:] + done.stderr
    for (_, printed, code), step in zip(blocks, tour, strict=True):
        if step.expected is None:
            assert code == "0", f"`{step.command}` exited {code}:\n{printed[-3000:]}"
            continue
        got = DECISION_ID.sub("ID", printed).rstrip("\n").splitlines()
        want = [DECISION_ID.sub("ID", line) for line in step.expected]
        assert got == want, f"`{step.command}` printed:\n{printed}"
