{{/* The chart's name, or nameOverride. */}}
{{- define "safemode.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of every resource: fullnameOverride, or RELEASE-NAME (RELEASE
alone when it already holds the name), cut to the 63 characters of a DNS label.
*/}}
{{- define "safemode.fullname" -}}
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

{{- define "safemode.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every resource carries. */}}
{{- define "safemode.labels" -}}
helm.sh/chart: {{ include "safemode.chart" . }}
{{ include "safemode.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The labels that pick this release's pods: never change them in an upgrade. */}}
{{- define "safemode.selectorLabels" -}}
app.kubernetes.io/name: {{ include "safemode.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "safemode.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "safemode.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "safemode.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The name the replicas' certificates carry: the Service's DNS name by default. */}}
{{- define "safemode.peerName" -}}
{{- default (printf "%s.%s.svc" (include "safemode.fullname" .) .Release.Namespace) .Values.tls.peerName }}
{{- end }}

{{/* The ConfigMap holding the modes, or "" for the built-in ones. */}}
{{- define "safemode.modesConfigMap" -}}
{{- if .Values.modes.existingConfigMap }}
{{- .Values.modes.existingConfigMap }}
{{- else if .Values.modes.files }}
{{- printf "%s-modes" (include "safemode.fullname" .) }}
{{- end }}
{{- end }}

{{/* The ConfigMap holding the runbooks, or "" for the built-in ones. */}}
{{- define "safemode.runbooksConfigMap" -}}
{{- if .Values.runbooks.existingConfigMap }}
{{- .Values.runbooks.existingConfigMap }}
{{- else if .Values.runbooks.files }}
{{- printf "%s-runbooks" (include "safemode.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Refuses values that the schema cannot tell apart from good ones: each a
one-line reason and what to do.
*/}}
{{- define "safemode.validate" -}}
{{- if ge (int .Values.podDisruptionBudget.minAvailable) (int .Values.replicaCount) }}
{{- fail (printf "podDisruptionBudget.minAvailable (%d) must be less than replicaCount (%d), or no node could ever be drained" (int .Values.podDisruptionBudget.minAvailable) (int .Values.replicaCount)) }}
{{- end }}
{{- range .Values.etcd.endpoints }}
{{- if and $.Values.etcd.tls.enabled (not (hasPrefix "https://" .)) }}
{{- fail (printf "etcd.tls.enabled needs https:// endpoints, and %s is not one: give https:// URLs or set etcd.tls.enabled=false" .) }}
{{- end }}
{{- if and (not $.Values.etcd.tls.enabled) (hasPrefix "https://" .) }}
{{- fail (printf "etcd endpoint %s is https://: set etcd.tls.enabled=true and etcd.tls.secretName to the Secret with its ca.crt" .) }}
{{- end }}
{{- end }}
{{- if and .Values.modes.files .Values.modes.existingConfigMap }}
{{- fail "give modes.files or modes.existingConfigMap, not both" }}
{{- end }}
{{- if and .Values.runbooks.files .Values.runbooks.existingConfigMap }}
{{- fail "give runbooks.files or runbooks.existingConfigMap, not both" }}
{{- end }}
{{- if and .Values.console.behindTLSProxy .Values.tls.enabled }}
{{- fail "console.behindTLSProxy is for a plain-HTTP http port behind a TLS proxy, but with tls.enabled that port speaks HTTPS with the same certificate and serves the console itself: unset console.behindTLSProxy" }}
{{- end }}
{{- end }}

{{/*
Every address of the pod, in its family: 0.0.0.0 for IPv4, [::] for IPv6
(which Linux also opens to IPv4).
*/}}
{{- define "safemode.anyAddress" -}}
{{- if eq .Values.podIPFamily "IPv6" -}}[::]{{- else -}}0.0.0.0{{- end -}}
{{- end }}
