"""Policy ConfigMaps as YAML text, for the tests and benchmarks that write policy files.

One place spells the ConfigMap around a rule list, so that a change to the
label or the key is made once for the end-to-end tests, the unit tests and
the benchmarks alike.
"""

from __future__ import annotations

import textwrap


def policy_configmap(name: str, namespace: str, rules: str) -> str:
    """A policy ConfigMap; `rules` is the YAML list under `rules:`."""
    body = "mode: enforce\nrules:\n" + textwrap.indent(textwrap.dedent(rules).strip(), "  ")
    return f"""\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {name}
  namespace: {namespace}
  labels:
    egress-authz.io/policy: "true"
data:
  policy.yaml: |
{textwrap.indent(body, "    ")}
"""
