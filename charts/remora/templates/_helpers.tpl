{{/* An image: <registry>/<name>:<tag>. Call with (dict "root" $ "name" "proxy"). */}}
{{- define "remora.image" -}}
{{ .root.Values.image.registry }}/{{ .name }}:{{ .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end }}

{{- define "remora.labels" -}}
app.kubernetes.io/name: remora
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "remora.selector" -}}
app.kubernetes.io/name: remora
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{/* The controller's Service, as proxies and the API server reach it. */}}
{{- define "remora.service" -}}
remora-controller.{{ .Release.Namespace }}.svc
{{- end }}

{{/* Whether the identity is generated here (nothing supplied). */}}
{{- define "remora.identityGenerated" -}}
{{- if not (or .Values.identity.issuer.existingSecret .Values.identity.issuer.certPEM .Values.identity.trustAnchorsPEM) -}}true{{- end -}}
{{- end }}
