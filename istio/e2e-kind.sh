#!/usr/bin/env bash
# e2e-kind.sh: the seed scenario in a real mesh, on your machine.
#
# Brings up a kind cluster, installs Istio with the egress-authz mesh config and
# an egress gateway, builds and loads the egress-authz image, installs the Helm
# chart, applies the example policies and three test pods, then checks that
#   shop/api-connector reaches api.kadath.io, shop/finance reaches api.leng.com,
#   and every other combination (and the cluster-denied api.stealyourmoney.com)
#   is refused,
# and prints the decisions with `egress-authz traces`.
#
# Needs: a running Docker engine, kind, kubectl, istioctl (1.22 or later), helm 3
# or 4, openssl, curl. It is NOT run in CI: our CI machines have no Docker
# engine, so it is kept correct by review against Istio's documentation and by
# tests/test_istio_config.py (syntax, and that it uses the shipped files).
#
# The external hosts are fake: a TLS server pod in the unmeshed namespace
# `outside`, whose pod IP the cluster DNS answers for api.kadath.io,
# api.leng.com and api.stealyourmoney.com (a CoreDNS `hosts` block). The egress
# gateway resolves and dials them exactly as it would real internet hosts.
#
# Usage: istio/e2e-kind.sh            (from anywhere; keeps the cluster)
#        CLUSTER=name istio/e2e-kind.sh
#        istio/e2e-kind.sh --delete   (delete the cluster afterwards)

set -euo pipefail

CLUSTER="${CLUSTER:-egress-authz-e2e}"
IMAGE_REPO="egress-authz"
IMAGE_TAG="e2e"
NAMESPACE="egress-authz"
GATEWAY_NAMESPACE="istio-egress"
FAKE_HOSTS=(api.kadath.io api.leng.com api.stealyourmoney.com)
DELETE_AFTER=0
[[ "${1:-}" == "--delete" ]] && DELETE_AFTER=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CTX="kind-${CLUSTER}"
k() { kubectl --context "$CTX" "$@"; }
step() { printf '\n== %s\n' "$*"; }

for tool in docker kind kubectl istioctl helm openssl; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool" >&2; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "no Docker engine reachable" >&2; exit 2; }

cleanup() {
  if [[ "$DELETE_AFTER" == 1 ]]; then
    kind delete cluster --name "$CLUSTER"
  else
    echo
    echo "Cluster kept. Look around with: kubectl --context $CTX ..."
    echo "Delete it with: kind delete cluster --name $CLUSTER"
  fi
}
trap cleanup EXIT

step "kind cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s
fi

step "image ${IMAGE_REPO}:${IMAGE_TAG}"
docker build -t "${IMAGE_REPO}:${IMAGE_TAG}" "$ROOT"
kind load docker-image "${IMAGE_REPO}:${IMAGE_TAG}" --name "$CLUSTER"

step "Istio: REGISTRY_ONLY, the egress-authz extension provider, an egress gateway"
k create namespace "$GATEWAY_NAMESPACE" --dry-run=client -o yaml | k apply -f -
istioctl --context "$CTX" install -y -f istio/mesh-config.yaml
k -n "$GATEWAY_NAMESPACE" rollout status deployment/istio-egressgateway --timeout=180s

step "fake internet: a TLS server in namespace outside, answered for ${FAKE_HOSTS[*]}"
workdir="$(mktemp -d)"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 \
  -keyout "$workdir/tls.key" -out "$workdir/tls.crt" -subj "/CN=${FAKE_HOSTS[0]}" \
  -addext "subjectAltName=$(printf 'DNS:%s,' "${FAKE_HOSTS[@]}" | sed 's/,$//')" 2>/dev/null
k create namespace outside --dry-run=client -o yaml | k apply -f -
k -n outside create secret tls fake-internet --cert "$workdir/tls.crt" --key "$workdir/tls.key" \
  --dry-run=client -o yaml | k apply -f -
k apply -f - <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: fake-internet
  namespace: outside
data:
  default.conf: |
    server {
      listen 443 ssl;
      listen 80;
      ssl_certificate /tls/tls.crt;
      ssl_certificate_key /tls/tls.key;
      location / { return 200 "hello from $host\n"; }
    }
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: fake-internet
  namespace: outside
spec:
  replicas: 1
  selector:
    matchLabels: {app: fake-internet}
  template:
    metadata:
      labels: {app: fake-internet}
    spec:
      containers:
        - name: nginx
          image: nginx:1.27-alpine
          ports: [{containerPort: 443}, {containerPort: 80}]
          volumeMounts:
            - {name: conf, mountPath: /etc/nginx/conf.d}
            - {name: tls, mountPath: /tls, readOnly: true}
      volumes:
        - {name: conf, configMap: {name: fake-internet}}
        - {name: tls, secret: {secretName: fake-internet}}
EOF
k -n outside rollout status deployment/fake-internet --timeout=120s
# The fake hosts resolve to the pod's IP, deliberately with no Service in front:
# a Service's ClusterIP gets its own listener in every sidecar, which would route
# around the egress gateway; a bare pod IP is as foreign to the mesh as the internet.
fake_ip="$(k -n outside get pod -l app=fake-internet --field-selector=status.phase=Running \
  -o jsonpath='{.items[0].status.podIP}')"
corefile="$(k -n kube-system get configmap coredns -o jsonpath='{.data.Corefile}')"
if ! grep -q "${fake_ip} ${FAKE_HOSTS[*]}" <<<"$corefile"; then
  # Drop the hosts block of an earlier run (the pod IP may have changed), then add ours.
  corefile="$(awk '/^    hosts \{/ {skip=1} !skip {print} skip && /^    \}/ {skip=0}' <<<"$corefile")"
  block="    hosts {\n        ${fake_ip} ${FAKE_HOSTS[*]}\n        fallthrough\n    }"
  corefile="$(awk -v block="$block" '{print} /^\.:53 \{/ && !done {print block; done=1}' <<<"$corefile")"
  k -n kube-system create configmap coredns --from-literal=Corefile="$corefile" \
    --dry-run=client -o yaml | k apply -f -
  k -n kube-system rollout restart deployment/coredns
  k -n kube-system rollout status deployment/coredns --timeout=120s
fi

step "egress-authz (Helm chart)"
helm --kube-context "$CTX" upgrade --install egress-authz charts/egress-authz \
  --namespace "$NAMESPACE" --create-namespace \
  --set image.repository="$IMAGE_REPO" --set image.tag="$IMAGE_TAG" \
  --set image.pullPolicy=Never \
  --set gatewayNamespace="$GATEWAY_NAMESPACE" \
  --wait --timeout 180s

step "workloads and policies"
k apply -f istio/e2e/shop-workloads.yaml
k apply -f istio/examples/
for d in api-connector finance storefront; do
  k -n shop rollout status "deployment/$d" --timeout=180s
done

step "waiting for egress-authz to write the ServiceEntries"
for _ in $(seq 1 60); do
  if k -n shop get serviceentries.networking.istio.io \
      -l app.kubernetes.io/managed-by=egress-authz -o name 2>/dev/null | grep -q .; then
    break
  fi
  sleep 2
done
k -n shop get serviceentries,virtualservices,destinationrules -l app.kubernetes.io/managed-by=egress-authz
sleep 5  # let istiod push the new routes to the sidecars and the gateway

step "seed scenario"
failures=0
expect() {  # expect <deployment> <host> allow|deny
  local from="$1" host="$2" want="$3" code
  code="$(k -n shop exec "deploy/$from" -c curl -- \
    curl -sk --max-time 10 -o /dev/null -w '%{http_code}' "https://$host/" 2>/dev/null || true)"
  local got=deny
  [[ "$code" == "200" ]] && got=allow
  if [[ "$got" == "$want" ]]; then
    printf '  ok    %-14s -> %-24s %s\n' "$from" "$host" "$got"
  else
    printf '  FAIL  %-14s -> %-24s wanted %s, got %s (HTTP %s)\n' "$from" "$host" "$want" "$got" "${code:-none}"
    failures=$((failures + 1))
  fi
}
expect api-connector api.kadath.io          allow
expect finance       api.leng.com           allow
expect api-connector api.leng.com           deny
expect finance       api.kadath.io          deny
expect storefront    api.kadath.io          deny
expect storefront    api.leng.com           deny
expect api-connector api.stealyourmoney.com deny

step "decisions (egress-authz traces, inside each replica: each knows the Checks it answered)"
for pod in $(k -n "$NAMESPACE" get pod -l app.kubernetes.io/name=egress-authz -o name); do
  echo "-- $pod"
  k -n "$NAMESPACE" exec "$pod" -- egress-authz traces --server "http://127.0.0.1:9090" --since 10m || true
done

if [[ "$failures" -gt 0 ]]; then
  echo
  echo "$failures check(s) failed. Gateway logs: kubectl --context $CTX -n $GATEWAY_NAMESPACE logs deploy/istio-egressgateway"
  exit 1
fi
echo
echo "seed scenario: all checks passed"
