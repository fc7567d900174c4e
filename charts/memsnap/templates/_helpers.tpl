{{/* Names and labels shared by every template. */}}
{{- define "memsnap.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "memsnap.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: include "memsnap.selector" (list . "agent") */}}
{{- define "memsnap.selector" -}}
{{- $top := index . 0 -}}
app.kubernetes.io/name: {{ $top.Chart.Name }}
app.kubernetes.io/instance: {{ $top.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "memsnap.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Whether cert-manager makes the CA (asked for, and its API is there). */}}
{{- define "memsnap.certManager" -}}
{{- if and (not .Values.tls.existingSecret) .Values.tls.certManager.enabled (.Capabilities.APIVersions.Has "cert-manager.io/v1/Certificate") -}}
true
{{- end -}}
{{- end -}}

{{/* The CA Secret's keys: cert-manager writes tls.crt and tls.key. */}}
{{- define "memsnap.caFiles" -}}
{{- if include "memsnap.certManager" . -}}
tls.crt tls.key
{{- else -}}
ca.crt ca.key
{{- end -}}
{{- end -}}

{{- define "memsnap.caSecret" -}}
{{- .Values.tls.existingSecret | default (printf "%s-ca" (include "memsnap.fullname" .)) -}}
{{- end -}}

{{/* Pod annotations that roll pods when the image was rebuilt under the same tag. */}}
{{- define "memsnap.imageAnnotation" -}}
{{- with .Values.image.id }}
memsnap.io/image-id: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Environment every memsnap container gets: the API server's address if set. */}}
{{- define "memsnap.apiServerEnv" -}}
{{- with .Values.apiServer.host }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ . | quote }}
{{- end }}
{{- with .Values.apiServer.port }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ . | quote }}
{{- end }}
{{- end -}}
