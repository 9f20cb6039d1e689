"""`egress-authz demo`: the whole system on loopback, with real Envoys.

A gateway Envoy and one sidecar Envoy per pod (each with its own SPIFFE
certificate and pod IP), `egress-authz serve` with the example policies, and
HTTPS stand-ins for the external hosts; then a script of calls, a verdict
table checked against expectations, and the `traces` and `explain` views.
Built from the harness in authz.testing; nothing here is used by the service.
"""
