"""Harness for running egress-authz behind a real Envoy on loopback.

Shared by the end-to-end tests, the benchmarks and the demo: a throwaway CA
(`pki`), Envoy processes started from the configs in `istio/envoy/`
(`envoy`), upstream servers that record what reached them (`upstreams`),
clients that dial the gateway like a mesh workload would (`clients`), the
`egress-authz serve` subprocess (`service`) and a minimal always-OK ext_authz
server (`floor`). Nothing here is imported by the service itself.
"""
