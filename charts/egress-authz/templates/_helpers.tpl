{{/* Names and labels shared by every template. */}}

{{- define "egress-authz.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name: "egress-authz" when the release is called egress-authz. */}}
{{- define "egress-authz.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "egress-authz.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "egress-authz.selectorLabels" -}}
app.kubernetes.io/name: {{ include "egress-authz.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "egress-authz.labels" -}}
helm.sh/chart: {{ include "egress-authz.chart" . }}
{{ include "egress-authz.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: egress-authz
{{- end }}

{{- define "egress-authz.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "egress-authz.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "egress-authz.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The in-cluster DNS name Istio's extension provider must point at. */}}
{{- define "egress-authz.serviceHost" -}}
{{- printf "%s.%s.svc.cluster.local" (include "egress-authz.fullname" .) .Release.Namespace }}
{{- end }}

{{/* Labels of the egress gateway pods, as YAML (istio.gatewaySelector, or the labels
istio/ gives our gateway: Istio's istio=egressgateway plus egress-authz.io/gateway, a label
no other gateway has, since a Gateway's selector matches pods in every namespace). */}}
{{- define "egress-authz.gatewaySelector" -}}
{{- toYaml (default (dict "istio" "egressgateway" "egress-authz.io/gateway" "egress-authz") .Values.istio.gatewaySelector) }}
{{- end }}

{{/* The cluster DNS pods' labels as `k=v,k=v`, for --fence-dns-labels. */}}
{{- define "egress-authz.dnsLabelsArg" -}}
{{- $sel := default (dict "k8s-app" "kube-dns") .Values.networkPolicy.dns.podLabels }}
{{- $parts := list }}
{{- range $k := keys $sel | sortAlpha }}
{{- $parts = append $parts (printf "%s=%s" $k (index $sel $k)) }}
{{- end }}
{{- join "," $parts }}
{{- end }}

{{/* The same labels as `k=v,k=v`, for --gateway-selector. */}}
{{- define "egress-authz.gatewaySelectorArg" -}}
{{- $sel := default (dict "istio" "egressgateway" "egress-authz.io/gateway" "egress-authz") .Values.istio.gatewaySelector }}
{{- $parts := list }}
{{- range $k := keys $sel | sortAlpha }}
{{- $parts = append $parts (printf "%s=%s" $k (index $sel $k)) }}
{{- end }}
{{- join "," $parts }}
{{- end }}
