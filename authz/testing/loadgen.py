"""Load generators (h2load, wrk) and CPU accounting for the benchmarks.

Thin wrappers that run the tool, parse what it prints and hand back numbers:
h2load for gRPC straight at a Check port (it speaks h2c and can POST a
fixed body, which is all a unary gRPC call is), wrk for HTTP through Envoy.
CPU is read from /proc, per process tree, so a server's cost per request
is measured rather than guessed from wall time.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

TOOLS = {"h2load": "nghttp2-client", "wrk": "wrk"}


class LoadError(RuntimeError):
    pass


def ensure_tool(binary: str) -> str:
    """The tool's path; installs its Debian package when missing and root."""
    if found := shutil.which(binary):
        return found
    package = TOOLS[binary]
    if os.geteuid() != 0:
        raise LoadError(f"{binary} not found: install the Debian package {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "install", "-y", "-q", package],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", package],
    ):
        print(f"{binary} not found; running: {' '.join(cmd)}", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=False)
        if cmd[1] == "install" and done.returncode == 0:
            break
    if found := shutil.which(binary):
        return found
    raise LoadError(f"could not install {package} for {binary}")


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (uncompressed), 4-byte length, bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------ CPU


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces.
    return text[text.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """pid and all its live descendants (for --workers N servers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by pid and its descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = _stat_fields(p)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _CLK_TCK


# ------------------------------------------------------------------ h2load


@dataclass(frozen=True)
class H2LoadResult:
    requests: int
    succeeded: int
    failed: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    command: str


def run_h2load(
    url: str,
    body_file: Path,
    *,
    requests: int,
    clients: int = 8,
    streams: int = 2,
    rps_per_client: int | None = None,
    headers: tuple[str, ...] = ("content-type: application/grpc", "te: trailers"),
    timeout: float = 300,
) -> H2LoadResult:
    """POST `body_file` `requests` times over h2c; latency percentiles from --log-file."""
    h2load = ensure_tool("h2load")
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        log = Path(tmp) / "requests.tsv"
        cmd = [
            h2load,
            "-n",
            str(requests),
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-t",
            "1",
            "-d",
            str(body_file),
            f"--log-file={log}",
        ]
        for h in headers:
            cmd += ["-H", h]
        if rps_per_client is not None:
            cmd += ["--rps", str(rps_per_client)]
        cmd.append(url)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise LoadError(f"h2load failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        command = (
            shlex.join(cmd)
            .replace(str(body_file), body_file.name)
            .replace(f"--log-file={log}", "--log-file=requests.tsv")
            .replace(h2load, "h2load")
        )
        return parse_h2load(done.stdout, log.read_text(), command)


def parse_h2load(out: str, log_text: str, command: str = "") -> H2LoadResult:
    """h2load's summary for counts and rate; its --log-file rows (start µs,
    HTTP status, µs to end of response) for the latency percentiles, which
    the summary does not give. HTTP 2xx is all h2load checks: a gRPC error
    is a 200 with a grpc-status trailer, so callers check one answer first."""
    latencies_ms = []
    for line in log_text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            latencies_ms.append(int(parts[2]) / 1000)
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    r = re.search(
        r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out
    )
    if not m or not r:
        raise LoadError(f"cannot parse h2load output:\n{out}")
    seconds = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    return H2LoadResult(
        requests=int(r.group(1)),
        succeeded=int(r.group(2)),
        failed=int(r.group(3)),
        seconds=seconds,
        rps=float(m.group(3)),
        p50_ms=percentile(latencies_ms, 50),
        p99_ms=percentile(latencies_ms, 99),
        command=command,
    )


# ------------------------------------------------------------------ wrk


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    command: str


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise LoadError(f"bad wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(
    url: str,
    *,
    seconds: int = 5,
    connections: int = 16,
    threads: int = 1,
    headers: tuple[str, ...] = (),
    timeout: float = 120,
) -> WrkResult:
    wrk = ensure_tool("wrk")
    cmd = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise LoadError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return parse_wrk(done.stdout, shlex.join(cmd).replace(wrk, "wrk"))


def parse_wrk(out: str, command: str = "") -> WrkResult:
    """wrk --latency output: rate, totals, the 50%/99% rows, error counts."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and total and p50 and p99):
        raise LoadError(f"cannot parse wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        requests=int(total.group(1)),
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        command=command,
    )
