{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "ocr-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects. A release whose name already contains the
chart name (e.g. "ocr-operator") uses the release name alone.
*/}}
{{- define "ocr-operator.fullname" -}}
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

{{- define "ocr-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "ocr-operator.labels" -}}
helm.sh/chart: {{ include "ocr-operator.chart" . }}
{{ include "ocr-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: ocr-serving
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the operator's pods; never change them on upgrade. */}}
{{- define "ocr-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ocr-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ocr-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ocr-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ocr-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The rights `ocr-operator run` uses on the objects of the namespaces it
reconciles (see clusterrole.yaml for why each is needed). Granted
cluster-wide by the ClusterRole, or with watchNamespaces by a Role in each
listed namespace.
*/}}
{{- define "ocr-operator.pipelineRules" -}}
- apiGroups: ["ocr.serving.dev"]
  resources: ["ocrpipelines"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["ocr.serving.dev"]
  resources: ["ocrpipelines/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects", "triggerauthentications"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
watchNamespaces as "a,b" (empty: every namespace). A list, or a
comma-separated string from `--set watchNamespaces=a`; each entry must be a
namespace name (a DNS label).
*/}}
{{- define "ocr-operator.watchNamespaces" -}}
{{- $namespaces := .Values.watchNamespaces | default list }}
{{- if kindIs "string" $namespaces }}
{{- $namespaces = splitList "," $namespaces }}
{{- end }}
{{- $namespaces = $namespaces | compact | uniq }}
{{- range $namespaces }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$" (toString .)) }}
{{- fail (printf "watchNamespaces: %q is not a namespace name (a DNS label)" (toString .)) }}
{{- end }}
{{- end }}
{{- join "," $namespaces }}
{{- end }}
