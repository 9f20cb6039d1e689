"""`egress-authz serve`: the ext_authz gRPC service Envoy calls.

Wires the stages together: policy sources -> store -> gRPC Check server ->
recorder, plus the workload index and the admin endpoint. With --workers N
a small supervisor process starts N serving processes that share the gRPC
port through SO_REUSEPORT; each loads policies and workloads on its own.

Logs are plain lines on stderr; stdout is the decision log's.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the heavy modules are imported inside run(): `--help` stays fast
    from authz.envoy.server import AuthzServer, ThreadedAuthzServer
    from authz.gateway_ports import GatewayPorts
    from authz.records import Recorder
    from authz.sources import PolicySource, WorkloadFileSource
    from authz.store import PolicyStore
    from authz.workloads import WorkloadIndex

log = logging.getLogger("egress-authz")

DEFAULT_GRPC_ADDRESS = "127.0.0.1:9000"
DEFAULT_ADMIN_ADDRESS = "127.0.0.1:9090"
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_CLUSTER_NAMESPACE = "egress-authz"  # authz.loader.DEFAULT_CLUSTER_NAMESPACE
DEFAULT_CLUSTER_DOMAIN = "cluster.local"  # authz.hosts.DEFAULT_CLUSTER_DOMAIN
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad flags: reported on stderr with exit code 2."""


class StartError(Exception):
    """Something `serve` needs could not start (a port taken): stderr, exit code 1."""


# --------------------------------------------------------------------------
# Flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("policy sources")
    src.add_argument(
        "--policies", metavar="PATH",
        help="a YAML file or directory of policy ConfigMaps; reloaded when files change",
    )
    src.add_argument(
        "--workloads", metavar="PATH",
        help="Pod manifests (files or `kubectl get pods -o yaml` dumps) mapping source IP "
        "to namespace, service account and labels; reloaded when files change",
    )
    src.add_argument(
        "--wait-for-paths", action="store_true",
        help="start even if --policies or --workloads does not exist yet, and load it when "
        "it appears (denying everything until then); without it a missing path is an error",
    )
    src.add_argument(
        "--cluster-namespace", default=DEFAULT_CLUSTER_NAMESPACE, metavar="NS",
        help="namespace whose ConfigMaps labelled egress-authz.io/tier=cluster form the "
        "cluster tier (default: %(default)s)",
    )
    src.add_argument(
        "--cluster-domain", type=_cluster_domain, default=DEFAULT_CLUSTER_DOMAIN,
        metavar="DOMAIN",
        help="the cluster's DNS domain: namespace policies may not allow hosts under it; "
        "with --kube also the domain of the gateway Service's name (default: %(default)s)",
    )
    src.add_argument(
        "--trust-domain", default=DEFAULT_TRUST_DOMAIN,
        help="SPIFFE trust domain of accepted principals (default: %(default)s)",
    )
    src.add_argument(
        "--gateway-port-map", type=_port_map, default=None, metavar="LISTEN:PORT,...",
        help="gateway listener port -> the Service port apps dial, e.g. 8443:443,8080:80; "
        "Checks on other listener ports are denied. Default: listener ports are judged as "
        "is, or with --kube learnt from the gateway Service (--gateway-service)",
    )
    src.add_argument(
        "--unknown-workloads", choices=("deny", "allow"), default="deny",
        help="a caller whose source address no live Pod has (with --kube or --workloads): "
        "deny it as unknown-workload (default), or allow the principal alone to identify it, "
        "for meshes whose gateway does not see Pod IPs (SNAT, multi-cluster); label rules "
        "never match such callers",
    )
    net = p.add_argument_group("serving")
    net.add_argument(
        "--grpc-address", default=DEFAULT_GRPC_ADDRESS, metavar="HOST:PORT",
        help="where Envoy's ext_authz filters call Check (default: %(default)s)",
    )
    net.add_argument(
        "--admin-address", default=DEFAULT_ADMIN_ADDRESS, metavar="HOST:PORT",
        help="health, readiness, metrics and decisions over HTTP; '' turns it off "
        "(default: %(default)s)",
    )
    net.add_argument(
        "--admin-max-streams", type=_positive, default=32, metavar="N",
        help="open /v1/decisions/stream clients at most; more get 503 (default: %(default)s)",
    )
    net.add_argument(
        "--admin-allowed-hosts", type=_names, default=[], metavar="NAME[,NAME]",
        help="host names the admin endpoint answers besides localhost, its bound address "
        "and IP addresses (others get 421: DNS rebinding), e.g. a Service's DNS name",
    )
    net.add_argument(
        "--workers", type=_positive, default=1, metavar="N",
        help="serving processes sharing the gRPC port with SO_REUSEPORT (default: 1)",
    )
    net.add_argument(
        "--separate-admin", action=argparse.BooleanOptionalAction, default=False,
        help="serve the admin endpoint (metrics, decisions, streams, page) from a supervising "
        "process, even with one worker, so that its readers never hold the Check process's "
        "interpreter lock; the chart turns it on (default: off)",
    )
    net.add_argument(
        "--server-model", choices=("threads", "aio"), default="threads",
        help="how a process answers Checks: grpcio's threaded server (default; measured "
        "faster through Envoy) or one grpc.aio event loop (faster under h2load on idle "
        "cores); see docs/benchmarks.md (default: %(default)s)",
    )
    net.add_argument(
        "--threads", type=_positive, default=None, metavar="N",
        help="threads answering Checks with --server-model threads (default 2: the "
        "fastest measured, docs/benchmarks.md); "
        "no effect with aio (use --workers for more cores)",
    )
    net.add_argument(
        "--shutdown-delay", type=float, default=0.0, metavar="SECONDS",
        help="on SIGTERM, keep answering Checks this long while health says NOT_SERVING, "
        "so that Envoy and Kubernetes move traffic away first (default: %(default)s)",
    )
    net.add_argument(
        "--shutdown-grace", type=float, default=5.0, metavar="SECONDS",
        help="on SIGTERM, how long in-flight Checks may take to finish (default: %(default)s)",
    )
    net.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"),
        help="stderr log level (default: %(default)s)",
    )
    rec = p.add_argument_group("decision recording (see authz/observe/; spans need OTEL_* env)")
    rec.add_argument(
        "--trace-allow-ratio", type=_ratio, default=0.1, metavar="R",
        help="share of allowed Checks that get an OpenTelemetry span; denials, audit "
        "verdicts and allows whose caller's traceparent is sampled always get one "
        "(default: %(default)s)",
    )
    rec.add_argument(
        "--decision-buffer", type=_positive, default=10_000, metavar="N",
        help="recent decisions kept in memory for `egress-authz traces` (default: %(default)s)",
    )
    rec.add_argument(
        "--decision-log", action=argparse.BooleanOptionalAction, default=True,
        help="write one JSON line per decision to stdout (default: on)",
    )
    rec.add_argument(
        "--record-query-values", action="store_true",
        help="keep query values in recorded paths; by default only the parameter names "
        "are kept (/v1/report?api_key), as values are often secrets",
    )
    # Set by the --workers supervisor on the processes it starts.
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-record-fd", type=int, default=-1, help=argparse.SUPPRESS)
    from authz.kube.flags import add_arguments as add_kube_arguments  # light: flags only

    add_kube_arguments(p)


def _cluster_domain(text: str) -> str:
    from authz.hosts import PatternError, parse_cluster_domain

    try:
        return parse_cluster_domain(text)
    except PatternError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from e


def _ratio(text: str) -> float:
    r = float(text)
    if not 0.0 <= r <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {r:g}")
    return r


def _port_map(text: str) -> str:
    from authz.gateway_ports import PortMapError, format_port_map, parse_port_map

    try:  # kept as text, normalised, so that --workers can hand it on as is
        return format_port_map(parse_port_map(text))
    except PortMapError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve Envoy ext_authz Check over gRPC",
        description="Serve envoy.service.auth.v3.Authorization/Check for Envoy's HTTP and "
        "network ext_authz filters, from policies reloaded as they change.",
    )
    add_arguments(p)
    p.set_defaults(run=run)
    return p


def build_arg_parser() -> argparse.ArgumentParser:
    """`serve`'s flags alone (prog "egress-authz serve"), e.g. to dry-parse chart args."""
    p = argparse.ArgumentParser(prog="egress-authz serve")
    add_arguments(p)
    p.set_defaults(run=run)
    return p


# --------------------------------------------------------------------------
# The pluggable parts: one small function each


def build_policy_sources(
    args: argparse.Namespace, index: WorkloadIndex | None = None,
    ports: GatewayPorts | None = None,
) -> list[PolicySource]:
    """Which sources feed the store. A Kubernetes source adds one branch here."""
    from authz.observe.metrics import METRICS  # the process's own: what /metrics serves
    from authz.sources import DirectorySource

    sources: list[PolicySource] = []
    _require_paths(args)
    if args.policies:
        sources.append(
            DirectorySource(
                args.policies, cluster_namespace=args.cluster_namespace,
                cluster_domain=args.cluster_domain, metrics=METRICS,
            )
        )
    if getattr(args, "kube", False):
        from authz.kube.controller import KubeController
        from authz.workloads import WorkloadIndex

        # The Pod watch feeds the same index Check reads. (`is None`, not `or`:
        # an index is never falsy, but this once made --kube fill a second one.)
        sources.append(
            KubeController.from_args(
                args, WorkloadIndex() if index is None else index, ports, metrics=METRICS
            )
        )
    if not sources:
        raise UsageError("no policy source: give --policies PATH")
    if len(sources) > 1:
        # Each source publishes whole PolicySets; two would overwrite each other.
        raise UsageError("give one policy source")
    return sources


def _require_paths(args: argparse.Namespace) -> None:
    """A mistyped path would otherwise serve "deny everything" while looking healthy."""
    if getattr(args, "wait_for_paths", False):
        return
    for flag, path in (("--policies", args.policies), ("--workloads", args.workloads)):
        if path and not os.path.exists(path):
            raise UsageError(
                f"{flag} {path}: no such file or directory (--wait-for-paths starts anyway "
                "and loads it when it appears)"
            )


def build_gateway_ports(args: argparse.Namespace) -> GatewayPorts:
    """The gateway port map: the flag's; with --kube and no flag, empty (deny) until the
    gateway Service's watch fills it; otherwise none (listener ports judged as is)."""
    from authz.gateway_ports import GatewayPorts, parse_port_map

    if text := getattr(args, "gateway_port_map", None):
        return GatewayPorts(parse_port_map(text))
    return GatewayPorts({} if getattr(args, "kube", False) else None)


def build_workload_sources(
    args: argparse.Namespace, index: WorkloadIndex
) -> list[WorkloadFileSource]:
    from authz.sources import WorkloadFileSource

    return [WorkloadFileSource(args.workloads, index)] if args.workloads else []


def build_recorder(args: argparse.Namespace) -> Recorder:
    """What records each decision: metrics, ring buffer, decision log, spans."""
    from authz.observe.bounded import RecordLimits
    from authz.observe.metrics import METRICS  # the process's own: what /metrics serves
    from authz.observe.recorder import DecisionRecorder, TracingSettings
    from authz.observe.spans import TracingConfigError, spans_from_env

    try:
        # None unless OTEL_* asks for an exporter; else a child process builds
        # and exports the spans, off this process's GIL.
        spans = spans_from_env(metrics=METRICS)
    except TracingConfigError as e:
        raise UsageError(str(e)) from e
    settings = TracingSettings(
        ring_size=args.decision_buffer,
        allow_ratio=args.trace_allow_ratio,
        decision_log=args.decision_log,
        limits=RecordLimits(keep_query_values=args.record_query_values),
    )
    if spans is not None:
        log.info("tracing: spans exported per OTEL_* (allow ratio %g)", args.trace_allow_ratio)
    recorder = DecisionRecorder(settings, spans=spans, metrics=METRICS)
    if args.worker_record_fd >= 0:  # --workers: the supervisor's admin endpoint serves them
        from authz.observe.pooled import RecordForwarder

        recorder.forward = RecordForwarder(args.worker_record_fd, recorder.metrics)
    return recorder.start()


class Closeable(Protocol):
    def close(self) -> None: ...


def start_admin(args: argparse.Namespace, state: ServeState) -> Closeable | None:
    """Start the admin HTTP endpoint on args.admin_address; None when there is none.

    Under --workers no worker has one: the supervisor serves the pod's
    (authz/observe/pooled.py). Wired by the admin module; `state` holds what it reads.
    """
    if not args.admin_address:
        return None
    from authz.observe.admin import AdminServer
    from authz.observe.httpserve import HTTPLimits
    from authz.observe.recorder import DecisionRecorder

    recorder = state.recorder if isinstance(state.recorder, DecisionRecorder) else None
    limits = HTTPLimits(max_streams=args.admin_max_streams)
    try:
        admin = AdminServer(
            args.admin_address, recorder, state.ready, limits=limits,
            allowed_hosts=args.admin_allowed_hosts,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    except OSError as e:
        # Without it the probes fail and Kubernetes restarts the pod in a loop
        # with no clear cause: stop at once, saying why.
        raise StartError(
            f"cannot serve the admin endpoint on {args.admin_address}: "
            f"{e.strerror or e}; free the port, or give another --admin-address "
            "('' turns the endpoint off)"
        ) from e
    admin.start()
    log.info("admin endpoint on %s", admin.url)
    return admin


@dataclass
class ServeState:
    """Everything one serving process runs; the admin endpoint reads it."""

    store: PolicyStore
    workloads: WorkloadIndex
    recorder: Recorder
    server: AuthzServer | ThreadedAuthzServer
    sources: list[PolicySource] = field(default_factory=list)

    def ready(self) -> bool:
        return self.store.loaded


# --------------------------------------------------------------------------
# Running


def run(args: argparse.Namespace) -> int:
    _configure_logging(args)
    if args.threads is not None and args.server_model == "aio" and args.worker_index is None:
        log.warning(
            "--threads has no effect with --server-model aio: each serving process "
            "answers Checks on one event loop; use --workers N for more cores"
        )
    try:
        supervised = args.workers > 1 or (args.separate_admin and bool(args.admin_address))
        if supervised and args.worker_index is None:
            from authz.envoy.workers import supervise

            if args.grpc_address.endswith(":0"):
                flag = "--workers" if args.workers > 1 else "--separate-admin"
                raise UsageError(f"{flag} needs a fixed --grpc-address port, not 0")

            return supervise(args, child_argv(args))
        return serve(args)
    except UsageError as e:
        print(f"egress-authz serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StartError as e:
        print(f"egress-authz serve: {e}", file=sys.stderr)
        return 1


def _bind_cause(address: str) -> str:
    """Why `address` (host:port) cannot be bound, as the kernel says it."""
    import socket

    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, int(port)))
    except (OSError, ValueError) as e:
        return getattr(e, "strerror", None) or str(e)
    return "gRPC could not bind it (set GRPC_VERBOSITY=debug for its reason)"


def serve(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or `stop` is set); 0 after a clean drain."""
    from authz.envoy.server import (
        DEFAULT_THREADS,
        AuthzServer,
        ServerSettings,
        ThreadedAuthzServer,
    )
    from authz.identity import UnknownWorkloads
    from authz.observe.metrics import METRICS
    from authz.store import PolicyStore
    from authz.workloads import WorkloadIndex

    stop = stop or threading.Event()
    store = PolicyStore(trust_domain=args.trust_domain)
    store.subscribe(lambda snapshot: METRICS.policy_revision.set(snapshot.revision))
    index = WorkloadIndex()
    ports = build_gateway_ports(args)
    policy_sources = build_policy_sources(args, index, ports)
    workload_sources = build_workload_sources(args, index)
    recorder = build_recorder(args)
    worker = args.worker_index is not None
    model = ThreadedAuthzServer if args.server_model == "threads" else AuthzServer
    server = model(
        store,
        index if has_pod_source(args) else None,
        recorder,
        ServerSettings(
            address=args.grpc_address, reuse_port=worker,
            threads=args.threads or DEFAULT_THREADS,
        ),
        ports,
        unknown_workloads=UnknownWorkloads(args.unknown_workloads),
    )
    _log_identity_mode(args)
    state = ServeState(store, index, recorder, server, list(policy_sources))
    _install_signal_handlers(stop)

    def start_sources() -> None:
        for ws in workload_sources:
            ws.start(on_error=lambda msg: log.error("%s", msg))
        for source in policy_sources:
            source.start(store, on_error=lambda msg: log.error("%s", msg))

    admin = None
    if worker:
        # Workers share the port (SO_REUSEPORT): one listening before its policy is in
        # force takes its share of connections and can only deny them with no-policy (a
        # restarted worker did so for 14.6 s with 31k rules). Load first, then listen.
        try:
            admin = start_admin(args, state)  # none under the supervisor (authz/observe/pooled.py)
        except StartError:
            _close_recorder(recorder)
            raise
        start_sources()
        if not store.loaded:  # fail closed: Envoy's connections go to the other workers
            log.info("worker %d: not listening on Check until a policy loads", args.worker_index)
        if not _wait_loaded(store, stop):  # stopped before a policy arrived: never listened
            _close(policy_sources, workload_sources, admin, recorder)
            return 0
    try:
        port = server.start()
    except RuntimeError as e:
        log.debug("gRPC start failed: %s", e)
        if worker:  # its sources and admin endpoint already run
            _close(policy_sources, workload_sources, admin, recorder)
        else:
            _close_recorder(recorder)
        # gRPC says only "Failed to bind" (the cause is in a C-core log line): ask the
        # kernel the same question to say why.
        raise StartError(
            f"cannot listen for Check on {args.grpc_address}: {_bind_cause(args.grpc_address)}"
            "; free the port, or give another --grpc-address"
        ) from e
    if not worker:
        try:
            admin = start_admin(args, state)
        except StartError:
            server.stop(0)
            _close_recorder(recorder)
            raise
        start_sources()
    store.subscribe(lambda snapshot: log.info("policy revision %d in force", snapshot.revision))

    address = f"{args.grpc_address.rpartition(':')[0]}:{port}"
    snapshot = store.current
    loaded = (
        f"policy revision {snapshot.revision}" if snapshot is not None
        else "no policy loaded: denying everything until one is"
    )
    if worker:
        log.info("worker %d serving Check on %s (%s)", args.worker_index, address, loaded)
        _report_ready(args.worker_ready_fd, snapshot.revision if snapshot else 0)
    else:
        # The line the end-to-end tests and operators wait for.
        print(f"egress-authz: serving Check on {address} ({loaded})", file=sys.stderr, flush=True)

    stop.wait()
    if args.shutdown_delay > 0:
        server.enter_graceful_shutdown()  # NOT_SERVING, while still answering
        log.info("shutting down: answering for %.1fs more while NOT_SERVING", args.shutdown_delay)
        time.sleep(args.shutdown_delay)
    log.info("shutting down: draining in-flight Checks (up to %.1fs)", args.shutdown_grace)
    server.stop(args.shutdown_grace)
    _close(policy_sources, workload_sources, admin, recorder)
    return 0


def _close(policy_sources: Sequence[PolicySource], workload_sources: Sequence[WorkloadFileSource],
           admin: Closeable | None, recorder: Recorder) -> None:
    for source in policy_sources:
        source.stop()
    for ws in workload_sources:
        ws.stop()
    if admin is not None:
        admin.close()
    close = getattr(recorder, "close", None)
    if callable(close):
        close()
    log.info("stopped")


def _close_recorder(recorder: Recorder) -> None:
    close = getattr(recorder, "close", None)
    if callable(close):
        close()


def _wait_loaded(store: PolicyStore, stop: threading.Event) -> bool:
    """Block until a policy is in force (True) or `stop` is set first (False)."""
    loaded = threading.Event()
    store.subscribe(lambda _snapshot: loaded.set())
    if store.loaded:  # published before we subscribed
        loaded.set()
    while not loaded.wait(0.1):
        if stop.is_set():
            return False
    return True


def has_pod_source(args: argparse.Namespace) -> bool:
    """Whether Pods are known (a Pod watch or --workloads): only then can a source
    address be checked against the certificate and labels be read."""
    return bool(getattr(args, "kube", False) or args.workloads)


def _log_identity_mode(args: argparse.Namespace) -> None:
    if not has_pod_source(args):
        log.warning(
            "no Pod source (--kube or --workloads): the certificate alone identifies callers, "
            "from any address, and rules that select by label never match"
        )
    elif args.unknown_workloads == "allow":
        log.warning(
            "--unknown-workloads allow: callers at addresses no Pod has are identified by "
            "their certificate alone"
        )


def _report_ready(fd: int | None, revision: int) -> None:
    if fd is None:
        return
    try:
        os.write(fd, f"ready {revision}\n".encode())
        os.close(fd)
    except OSError:
        pass  # the supervisor went away; serving goes on


def _install_signal_handlers(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # tests run serve() in a thread and stop it with the event
    handler: Callable[[int, Any], None] = lambda signum, frame: stop.set()  # noqa: E731
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _configure_logging(args: argparse.Namespace) -> None:
    who = "egress-authz" if args.worker_index is None else f"egress-authz[{args.worker_index}]"
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level.upper()),
        format=f"%(asctime)s {who} %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )


def child_argv(args: argparse.Namespace) -> Callable[[int, int, int], list[str]]:
    """argv for worker `index` reporting on `ready_fd`: the same flags, minus
    --workers and the admin endpoint.

    Rebuilt from the parser's own option list, so flags added later (a
    Kubernetes source) reach the workers without changes here.
    """
    parser = build_arg_parser()
    skip = {"help", "workers", "worker_index", "worker_ready_fd", "worker_record_fd",
            "admin_address", "separate_admin", "run"}
    base: list[str] = []
    for action in parser._actions:  # argparse has no public list of its actions
        if action.dest in skip or not action.option_strings:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:
            base.append(flag)
        elif isinstance(value, list):
            for item in value:
                base += [flag, str(item)]
        else:
            base += [flag, str(value)]

    def argv(index: int, ready_fd: int, record_fd: int) -> list[str]:
        return [
            sys.executable, "-m", "authz", "serve", *base,
            "--admin-address", "",  # the supervisor serves the pod's (authz/observe/pooled.py)
            "--worker-index", str(index), "--worker-ready-fd", str(ready_fd),
            "--worker-record-fd", str(record_fd),
        ]

    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    code: int = args.run(args)
    return code
