{{/* Names, labels and the node pod template shared by the three tiers. */}}

{{- define "aiflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "aiflow.fullname" -}}
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

{{- define "aiflow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "aiflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one tier: (dict "root" $ "tier" "edge") */}}
{{- define "aiflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aiflow.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .tier }}
{{- end }}

{{- define "aiflow.tierLabels" -}}
{{ include "aiflow.labels" .root }}
app.kubernetes.io/component: {{ .tier }}
{{- end }}

{{- define "aiflow.secretName" -}}
{{- $names := .root.Values.tls.secretNames -}}
{{- default (printf "%s-%s-tls" (include "aiflow.fullname" .root) .tier) (get $names .tier) }}
{{- end }}

{{/* The tier a tier connects to: device → edge (or cloud without edges), edge → cloud. */}}
{{- define "aiflow.parentTier" -}}
{{- if and (eq .tier "device") .root.Values.tiers.edge.enabled }}edge
{{- else if ne .tier "cloud" }}cloud
{{- end }}
{{- end }}

{{/* The --model argument. */}}
{{- define "aiflow.modelArg" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "pull" }}{{ required "model.name is required with model.source=pull" $m.name }}
{{- else if or (eq $m.source "image") (eq $m.source "volume") }}{{ required "model.path is required with model.source=image|volume" $m.path }}
{{- else }}{{ fail "model.source must be pull, image or volume" }}
{{- end }}
{{- end }}

{{/* Pod template of one tier: (dict "root" $ "tier" "edge") */}}
{{- define "aiflow.podTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $t := get $v.tiers .tier -}}
{{- $c := $v.common -}}
{{- $parent := include "aiflow.parentTier" . -}}
{{- $m := $v.model -}}
metadata:
  labels:
    {{- include "aiflow.selectorLabels" . | nindent 4 }}
    {{- with $c.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $c.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $c.terminationGracePeriodSeconds }}
  {{- if eq $m.source "pull" }}
  initContainers:
    - name: model-pull
      image: "{{ $v.image.repository }}:{{ $v.image.tag }}"
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        - model
        - pull
        - {{ $m.name | quote }}
        {{- range $m.pullArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        - name: AIFLOW_HOME
          value: /models
      {{- with $c.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: models
          mountPath: /models
  {{- end }}
  containers:
    - name: flow-node
      image: "{{ $v.image.repository }}:{{ $v.image.tag }}"
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        - --role
        - {{ .tier }}
        - --name
        - {{ $t.nodeName | quote }}
        - --model
        - {{ include "aiflow.modelArg" $root | quote }}
        - --layers
        - {{ $t.layers | quote }}
        {{- if $m.exits }}
        - --exits
        - {{ join "," $m.exits | quote }}
        {{- end }}
        {{- if ne .tier "device" }}
        - --listen
        - "0.0.0.0:{{ $v.ports.quic }}"
        {{- end }}
        {{- if $parent }}
        - --parent
        - "{{ include "aiflow.fullname" $root }}-{{ $parent }}.{{ $root.Release.Namespace }}.svc:{{ $v.ports.quic }}"
        - --parent-name
        - {{ (get $v.tiers $parent).nodeName | quote }}
        {{- end }}
        {{- if $t.mode }}
        - --mode
        - {{ $t.mode | quote }}
        {{- end }}
        - --http
        - "0.0.0.0:{{ $v.ports.http }}"
        - --threads
        - {{ $c.threads | quote }}
        - --ca
        - /pki/ca.crt
        - --cert
        - /pki/tls.crt
        - --key
        - /pki/tls.key
        {{- range $t.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        - name: RUST_LOG
          value: {{ $c.logLevel | quote }}
        - name: NO_COLOR
          value: "1"
        - name: RAYON_NUM_THREADS
          value: {{ $c.threads | quote }}
        - name: CANDLE_NUM_THREADS
          value: {{ $c.threads | quote }}
        - name: AIFLOW_HOME
          value: /models
        {{- with $c.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        {{- if ne .tier "device" }}
        - name: quic
          containerPort: {{ $v.ports.quic }}
          protocol: UDP
        {{- end }}
        - name: http
          containerPort: {{ $v.ports.http }}
          protocol: TCP
      # The HTTP API starts once the model is loaded: /health answers 200 from then on.
      startupProbe:
        httpGet: { path: /health, port: http }
        periodSeconds: 5
        failureThreshold: {{ div $c.startupSeconds 5 }}
      readinessProbe:
        httpGet: { path: /health, port: http }
        periodSeconds: 5
        failureThreshold: 2
      livenessProbe:
        httpGet: { path: /healthz, port: http }
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      {{- with $t.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: pki
          mountPath: /pki
          readOnly: true
        {{- if ne $m.source "image" }}
        - name: models
          mountPath: /models
          readOnly: {{ eq $m.source "volume" }}
        {{- end }}
  volumes:
    - name: pki
      secret:
        secretName: {{ include "aiflow.secretName" . }}
        defaultMode: 0400
    {{- if ne $m.source "image" }}
    - name: models
      {{- toYaml $m.volume | nindent 6 }}
    {{- end }}
  {{- with $t.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $t.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $t.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
