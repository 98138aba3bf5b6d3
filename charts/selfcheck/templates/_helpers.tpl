{{/*
Name of the chart, or nameOverride.
*/}}
{{- define "selfcheck.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: fullnameOverride, else "<release>-<name>" (just
"<release>" when it already contains the name), at most 63 characters (DNS label).
*/}}
{{- define "selfcheck.fullname" -}}
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

{{/*
"<chart>-<version>" for the helm.sh/chart label.
*/}}
{{- define "selfcheck.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels (stable across upgrades: never add to them).
*/}}
{{- define "selfcheck.selectorLabels" -}}
app.kubernetes.io/name: {{ include "selfcheck.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of every object (Kubernetes recommended labels).
*/}}
{{- define "selfcheck.labels" -}}
helm.sh/chart: {{ include "selfcheck.chart" . }}
{{ include "selfcheck.selectorLabels" . }}
app.kubernetes.io/version: {{ (default .Chart.AppVersion .Values.image.tag) | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mail-selfcheck
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "selfcheck.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "selfcheck.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image reference: repository@digest, else repository:tag (tag defaults to appVersion).
*/}}
{{- define "selfcheck.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Watched namespaces after templating, as a list (JSON-encoded, use with fromJsonArray);
empty list = cluster-wide. Duplicates and empty entries are dropped.
*/}}
{{- define "selfcheck.watchNamespaces" -}}
{{- $out := list }}
{{- range .Values.watchNamespaces }}
{{- $ns := tpl . $ | trim }}
{{- if and $ns (not (has $ns $out)) }}
{{- $out = append $out $ns }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
Fail before anything is created when a watched namespace does not exist (its Role could not
be created; Helm would leave the objects created before it behind, e.g. the -discovery
ClusterRole of a failed upgrade). Only when connected to a cluster: `lookup` returns nothing
under `helm template` and client-side dry runs, where the check is skipped (kube-system
exists in every cluster, so its absence means "no cluster").
*/}}
{{- define "selfcheck.checkWatchNamespaces" -}}
{{- if lookup "v1" "Namespace" "" "kube-system" }}
{{- range (include "selfcheck.watchNamespaces" . | fromJsonArray) }}
{{- if and (ne . $.Release.Namespace) (not (lookup "v1" "Namespace" "" .)) }}
{{- fail (printf "watchNamespaces: namespace %q does not exist; create it first (kubectl create namespace %s), then install or upgrade again" . .) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
True (non-empty string) when the install is cluster-wide.
*/}}
{{- define "selfcheck.clusterWide" -}}
{{- if not (include "selfcheck.watchNamespaces" . | fromJsonArray) }}true{{- end }}
{{- end }}

{{/*
Name of the metrics Service (also the Prometheus job label of the scraped series).
*/}}
{{- define "selfcheck.metricsServiceName" -}}
{{- printf "%s-metrics" (include "selfcheck.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
True when the metrics Service is rendered: metrics on, and the Service or the ServiceMonitor asked for.
*/}}
{{- define "selfcheck.metricsService" -}}
{{- if and (gt (int .Values.operator.metricsPort) 0) (or .Values.metrics.service.enabled .Values.metrics.serviceMonitor.enabled) }}true{{- end }}
{{- end }}

{{/*
The operator's permissions inside a watched namespace (Role rules; the ClusterRole of a
cluster-wide install has the same rules). Least privilege, derived from the controller
(operator/mail_selfcheck/controller) and kopf:
- MailSelfchecks: kopf lists/watches them and patches metadata (finalizer, annotations);
  the controller patches metadata (run-now annotation) and the status subresource.
- Jobs: created per check, read (get) while running, listed by owner label (adoption,
  history limits), watched by kopf for completion, deleted by history limits.
- Pods: the controller lists a Job's pods to read the probe's termination message.
- Events: transition Events (first failure, recovery) posted by kopf (core/v1).
Nothing on Secrets: probe pods receive Secret values through env valueFrom.secretKeyRef,
resolved by the kubelet; the operator never reads them.
*/}}
{{- define "selfcheck.rules" -}}
- apiGroups: ["selfcheck.mail-selfcheck.dev"]
  resources: ["mailselfchecks"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["selfcheck.mail-selfcheck.dev"]
  resources: ["mailselfchecks/status"]
  verbs: ["get", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
