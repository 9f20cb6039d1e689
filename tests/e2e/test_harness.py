"""The harness the end-to-end tests and benchmarks stand on (authz.testing).

Fast tests, except TestConfigs, which asks the real Envoy binary to
validate every config in istio/envoy/ as rendered.
"""

from __future__ import annotations

import re
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from authz.testing.envoy import CONFIG_DIR, EnvoyError, envoy_binary, free_port, render
from authz.testing.loadgen import grpc_frame, parse_h2load, parse_wrk, percentile
from authz.testing.pki import TestCA, spiffe_id

H2LOAD_OUT = """\
finished in 21.90ms, 913.16 req/s, 73.21KB/s
requests: 20 total, 20 started, 20 done, 20 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 20 2xx, 0 3xx, 0 4xx, 0 5xx
"""
H2LOAD_LOG = "".join(f"17957544794{i:05d}\t200\t{1000 * (i + 1)}\n" for i in range(20))

WRK_OUT = """\
Running 1s test @ http://127.0.0.1:19112/
  1 threads and 2 connections
  Latency Distribution
     50%    8.28ms
     75%   13.97ms
     90%   46.91ms
     99%  136.43ms
  225 requests in 1.00s, 141.44KB read
  Non-2xx or 3xx responses: 3
Requests/sec:    224.40
"""


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


class TestPKI:
    def test_workload_certificate_is_a_spiffe_svid(self, ca: TestCA) -> None:
        """A workload certificate names its identity only by a URI SAN, marked critical."""
        cred = ca.workload("shop", "cart")
        cert = x509.load_pem_x509_certificate(cred.cert_pem)
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        assert san.critical
        assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
            "spiffe://cluster.local/ns/shop/sa/cart"
        ]
        assert cred.uri == spiffe_id("shop", "cart")
        assert not cert.subject

    def test_server_certificate_verifies_for_its_names(self, ca: TestCA) -> None:
        """A server certificate chains to the CA and carries each DNS name."""
        cred = ca.server("api.kadath.io", "*.kadath.io")
        cert = x509.load_pem_x509_certificate(cred.cert_pem)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert names.value.get_values_for_type(x509.DNSName) == ["api.kadath.io", "*.kadath.io"]
        ctx = ssl.create_default_context(cafile=str(ca.ca_path))
        ctx.load_verify_locations(cadata=cred.cert_pem.decode())  # parses: well-formed PEM
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.ca_path.read_bytes()))

    def test_keys_are_private(self, ca: TestCA) -> None:
        """Key files are written 0600."""
        assert ca.workload("shop", "frontend").key_path.stat().st_mode & 0o077 == 0


class TestRender:
    def test_fills_placeholders_and_keeps_comments(self, tmp_path: Path) -> None:
        """${NAME} in config lines is filled; in comments it stays as documentation."""
        t = tmp_path / "t.yaml"
        t.write_text("# port ${PORT}\nport_value: ${PORT}\n")
        assert render(t, {"PORT": 8080}) == "# port ${PORT}\nport_value: 8080\n"

    def test_missing_value_is_an_error_with_a_line(self, tmp_path: Path) -> None:
        """An unfilled placeholder names the file and line instead of reaching Envoy."""
        t = tmp_path / "t.yaml"
        t.write_text("a: 1\nport_value: ${PORT}\n")
        with pytest.raises(EnvoyError, match=r"t\.yaml:2: no value for placeholder \$\{PORT\}"):
            render(t, {})

    def test_free_port_is_bindable(self) -> None:
        """free_port() gives a loopback port nothing listens on."""
        assert 1024 <= free_port() <= 65535


class TestLoadgen:
    def test_grpc_frame(self) -> None:
        """Flag byte 0, then the length big-endian in 4 bytes, then the message."""
        assert grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"

    def test_percentile_nearest_rank(self) -> None:
        """Nearest rank: p50 of 1..100 is 50, p99 is 99, p100 the maximum."""
        values = [float(v) for v in range(100, 0, -1)]
        assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (
            50.0,
            99.0,
            100.0,
        )

    def test_parse_h2load(self) -> None:
        """Rate and counts from the summary, percentiles from the per-request log."""
        r = parse_h2load(H2LOAD_OUT, H2LOAD_LOG)
        assert (r.requests, r.succeeded, r.failed) == (20, 20, 0)
        assert r.rps == pytest.approx(913.16)
        assert r.seconds == pytest.approx(0.0219)
        assert (r.p50_ms, r.p99_ms) == (10.0, 20.0)

    def test_parse_wrk(self) -> None:
        """Rate, totals, the 50% and 99% rows in ms, and non-2xx answers."""
        r = parse_wrk(WRK_OUT)
        assert (r.requests, r.rps, r.non_2xx) == (225, 224.40, 3)
        assert (r.p50_ms, r.p99_ms) == (8.28, 136.43)


@pytest.mark.envoy
@pytest.mark.timeout(60)
class TestConfigs:
    @pytest.mark.parametrize(
        "name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")), ids=lambda n: n
    )
    def test_envoy_accepts_the_rendered_config(self, name: str, ca: TestCA, tmp_path: Path) -> None:
        """Every template renders with all its placeholders and passes `envoy --mode validate`."""
        text = (CONFIG_DIR / name).read_text()
        placeholders = {
            m
            for line in text.splitlines()
            if not line.lstrip().startswith("#")
            for m in re.findall(r"\$\{(\w+)\}", line)
        }
        cred = ca.workload("shop", "cart")
        values: dict[str, object] = {}
        for p in placeholders:
            if p.endswith("_PORT"):
                values[p] = free_port()
            elif p.endswith("_CERT"):
                values[p] = ca.ca_path if p == "CA_CERT" else cred.cert_path
            elif p.endswith("_KEY"):
                values[p] = cred.key_path
            elif p.endswith("_IP"):
                values[p] = "127.0.0.2"
            elif p.endswith("_SAN"):
                values[p] = cred.uri
            elif p == "ACCESS_LOG":
                values[p] = tmp_path / "access.log"
            else:
                pytest.fail(f"{name}: no test value for placeholder ${{{p}}}")
        config = tmp_path / name
        config.write_text(render(CONFIG_DIR / name, values))
        done = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(config), "-l", "error"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
