#!/usr/bin/env bash
# e2e-kind.sh: the seed scenario in a real mesh, on your machine.
#
# Brings up a kind cluster, installs Istio with the egress-authz mesh config and
# an egress gateway, builds and loads the egress-authz image, installs the Helm
# chart, applies the example policies and three test pods, then checks that
#   shop/api-connector reaches api.kadath.io, shop/finance reaches api.leng.com,
#   and every other combination (and the cluster-denied api.stealyourmoney.com)
#   is refused,
# then the Istio-fidelity checks of issue 11 (istio/e2e/istio-fidelity.yaml):
#   istioctl analyze finds no error in what egress-authz wrote; the hosts Gateway
#   has unique server port names (two TLS hosts, or Istio's webhook refuses it);
#   hosts that slug alike each get their route (storefront is refused both: a lost
#   route would let it through without a Check); a TLS rule on 8443 works through
#   gateway port 8443; a cluster-tier host is reachable from a namespace with no
#   policy; a wildcard namespace is reported while unfenced and, once labelled,
#   fenced so the wildcard host cannot be reached around the gateway; only our
#   gateway pods carry the selector label; the connect-on-data patch is in effect
#   exactly when the gateway runs Istio 1.29 or later,
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
FAKE_HOSTS=(api.kadath.io api.leng.com api.stealyourmoney.com
  my-api.example.com my.api-example.com status.kadath.io www.kadath.io)
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
# A rule for 8443 is routed through the gateway Service's port 8443 (docs/install.md,
# "Ports"): give the Service that port.
if ! k -n "$GATEWAY_NAMESPACE" get service istio-egressgateway \
    -o jsonpath='{.spec.ports[*].port}' | grep -qw 8443; then
  k -n "$GATEWAY_NAMESPACE" patch service istio-egressgateway --type=json \
    -p='[{"op":"add","path":"/spec/ports/-","value":{"name":"tls-8443","port":8443,"targetPort":8443,"protocol":"TCP"}}]'
fi

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
      listen 8443 ssl;
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
          ports: [{containerPort: 443}, {containerPort: 8443}, {containerPort: 80}]
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
  --set networkPolicy.allowClusterPods=false \
  --wait --timeout 180s
# allowClusterPods=false: the fake internet is a pod, and a fence that allowed every
# pod would let a wildcard host through it; real internet hosts are never pods.

step "workloads and policies"
k apply -f istio/e2e/shop-workloads.yaml
k apply -f istio/examples/
k apply -f istio/e2e/istio-fidelity.yaml
for d in api-connector finance storefront; do
  k -n shop rollout status "deployment/$d" --timeout=180s
done
k -n elsewhere rollout status deployment/curl --timeout=180s
k -n wild rollout status deployment/curl --timeout=180s

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
expect() {  # expect [ns/]<deployment> <host[:port]> allow|deny
  local from="$1" host="$2" want="$3" code ns=shop
  if [[ "$from" == */* ]]; then ns="${from%%/*}"; from="${from#*/}"; fi
  code="$(k -n "$ns" exec "deploy/$from" -c curl -- \
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

check() {  # check <description> <command...>: counts a failure when the command fails
  local what="$1"; shift
  if "$@"; then
    printf '  ok    %s\n' "$what"
  else
    printf '  FAIL  %s\n' "$what"
    failures=$((failures + 1))
  fi
}

step "Istio fidelity (issue 11)"
# Item 1: Istio's webhook refuses servers sharing a port name; analyze finds the rest.
names="$(k -n "$GATEWAY_NAMESPACE" get gateway egress-authz-hosts \
  -o jsonpath='{range .spec.servers[*]}{.port.name}{"\n"}{end}' 2>/dev/null || true)"
check "hosts Gateway written, one server per host and port, port names unique" \
  test "$(sort <<<"$names" | uniq -d | wc -l)" -eq 0 -a "$(grep -c . <<<"$names")" -ge 5
check "istioctl analyze: no error in any namespace" \
  istioctl --context "$CTX" analyze --all-namespaces --failure-threshold Error
# Item 4: slug-alike hosts keep their own routes; a lost one would let storefront through.
expect api-connector my-api.example.com     allow
expect api-connector my.api-example.com     allow
expect storefront    my-api.example.com     deny
expect storefront    my.api-example.com     deny
# Item 2 (routing half): 8443 through gateway port 8443, to the host's 8443.
expect api-connector api.kadath.io:8443     allow
expect finance       api.kadath.io:8443     deny
# Item 3: the cluster tier from a namespace without a policy of its own.
expect elsewhere/curl status.kadath.io      allow
expect elsewhere/curl api.kadath.io         deny
# Item 7: reported while unfenced, fenced once labelled.
reported=""
for _ in $(seq 1 30); do
  reported="$(k -n wild get events --field-selector reason=WildcardUnfenced -o name 2>/dev/null || true)"
  [[ -n "$reported" ]] && break
  sleep 2
done
check "WildcardUnfenced Event on wild/egress-policy" test -n "$reported"
k label namespace wild egress-authz.io/egress-fence=true --overwrite
fenced=""
for _ in $(seq 1 30); do
  fenced="$(k -n wild get networkpolicy egress-authz-fence -o name 2>/dev/null || true)"
  [[ -n "$fenced" ]] && break
  sleep 1
done
check "fence NetworkPolicy written into wild" test -n "$fenced"
sleep 3  # the CNI programs the policy
expect wild/curl www.kadath.io              deny
# Item 6: only our gateway pods carry the selector label; gateways scoped to their namespace.
labelled="$(k get pods -A -l egress-authz.io/gateway=egress-authz \
  -o jsonpath='{range .items[*]}{.metadata.namespace}{"\n"}{end}' | sort -u)"
check "only $GATEWAY_NAMESPACE pods carry egress-authz.io/gateway" \
  test "$labelled" = "$GATEWAY_NAMESPACE"
check "istiod runs with PILOT_SCOPE_GATEWAY_TO_NAMESPACE=true" \
  bash -c "kubectl --context '$CTX' -n istio-system get deploy istiod -o yaml \
    | grep -A1 PILOT_SCOPE_GATEWAY_TO_NAMESPACE | grep -q '\"true\"'"
# Item 5: the connect-on-data patch is applied exactly when the gateway runs Istio 1.29+.
gw_pod="$(k -n "$GATEWAY_NAMESPACE" get pod -l egress-authz.io/gateway=egress-authz -o name | head -1)"
gw_version="$(k -n "$GATEWAY_NAMESPACE" get "$gw_pod" \
  -o jsonpath='{.spec.containers[?(@.name=="istio-proxy")].image}' | sed 's/.*://')"
patched=0
istioctl --context "$CTX" proxy-config listener -n "$GATEWAY_NAMESPACE" "${gw_pod#pod/}" -o json \
  | grep -qE '"upstream_connect_mode"|upstreamConnectMode' && patched=1
want_patched=0
if [[ "$gw_version" =~ ^1\.([0-9]+) ]] && (( BASH_REMATCH[1] >= 29 )); then want_patched=1; fi
if [[ "$gw_version" =~ ^([2-9]|[1-9][0-9]+)\. ]]; then want_patched=1; fi
check "connect-on-data patch in effect=$want_patched for gateway Istio $gw_version" \
  test "$patched" -eq "$want_patched"

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
