{{- define "budgetflow.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "budgetflow.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "budgetflow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "budgetflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "budgetflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "budgetflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "budgetflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "budgetflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "budgetflow.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/* The settings every budgetflow process shares: Kafka, topics, secrets, extra settings. */}}
{{- define "budgetflow.env" -}}
- name: BUDGETFLOW_DATA_DIR
  value: /data
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS
  value: {{ .Values.kafka.bootstrapServers | quote }}
- name: BUDGETFLOW_KAFKA__CLIENT_ID
  value: {{ include "budgetflow.fullname" . | quote }}
- name: BUDGETFLOW_KAFKA__SECURITY__PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
- name: BUDGETFLOW_KAFKA__SECURITY__SSL_CHECK_HOSTNAME
  value: {{ .Values.kafka.checkHostname | quote }}
- name: BUDGETFLOW_KAFKA__SESSION_TIMEOUT_MS
  value: {{ .Values.kafka.sessionTimeoutMs | int64 | quote }}
- name: BUDGETFLOW_KAFKA__HEARTBEAT_INTERVAL_MS
  value: {{ .Values.kafka.heartbeatIntervalMs | int64 | quote }}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}
{{- if not .Values.kafka.saslSecret.name }}
{{- fail "kafka.saslSecret.name is required with a SASL_* kafka.securityProtocol" }}
{{- end }}
{{- if not .Values.kafka.saslMechanism }}
{{- fail "kafka.saslMechanism is required with a SASL_* kafka.securityProtocol" }}
{{- end }}
- name: BUDGETFLOW_KAFKA__SECURITY__SASL_MECHANISM
  value: {{ .Values.kafka.saslMechanism | quote }}
- name: BUDGETFLOW_KAFKA__SECURITY__SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.saslSecret.name }}
      key: {{ .Values.kafka.saslSecret.usernameKey }}
- name: BUDGETFLOW_KAFKA__SECURITY__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.saslSecret.name }}
      key: {{ .Values.kafka.saslSecret.passwordKey }}
{{- end }}
{{- if .Values.kafka.caSecret.name }}
- name: BUDGETFLOW_KAFKA__SECURITY__SSL_CAFILE
  value: /etc/budgetflow/kafka-ca/{{ .Values.kafka.caSecret.key }}
{{- end }}
{{- if .Values.kafka.clientCertSecret.name }}
- name: BUDGETFLOW_KAFKA__SECURITY__SSL_CERTFILE
  value: /etc/budgetflow/kafka-client/{{ .Values.kafka.clientCertSecret.certKey }}
- name: BUDGETFLOW_KAFKA__SECURITY__SSL_KEYFILE
  value: /etc/budgetflow/kafka-client/{{ .Values.kafka.clientCertSecret.keyKey }}
{{- end }}
- name: BUDGETFLOW_TOPICS__PREFIX
  value: {{ .Values.topics.prefix | quote }}
- name: BUDGETFLOW_TOPICS__PARTITIONS
  value: {{ .Values.topics.partitions | int64 | quote }}
- name: BUDGETFLOW_TOPICS__REPLICATION_FACTOR
  value: {{ .Values.topics.replicationFactor | int64 | quote }}
- name: BUDGETFLOW_TOPICS__REQUESTS_RETENTION_MS
  value: {{ .Values.topics.requestsRetentionMs | int64 | quote }}
- name: BUDGETFLOW_TOPICS__REQUESTS_SEGMENT_MS
  value: {{ .Values.topics.requestsSegmentMs | int64 | quote }}
{{- if .Values.prices }}
- name: BUDGETFLOW_PRICING__FILE
  value: /etc/budgetflow/prices/prices.yaml
{{- end }}
{{- range $name, $value := .Values.settings }}
- name: {{ $name }}
  {{- /* YAML numbers reach templates as float64: print whole ones as integers, not as 1e+06. */}}
  {{- if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) }}
  value: {{ $value | int64 | toString | quote }}
  {{- else }}
  value: {{ $value | toString | quote }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "budgetflow.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.kafka.caSecret.name }}
- name: kafka-ca
  mountPath: /etc/budgetflow/kafka-ca
  readOnly: true
{{- end }}
{{- if .Values.kafka.clientCertSecret.name }}
- name: kafka-client
  mountPath: /etc/budgetflow/kafka-client
  readOnly: true
{{- end }}
{{- if .Values.prices }}
- name: prices
  mountPath: /etc/budgetflow/prices
  readOnly: true
{{- end }}
{{- end -}}

{{- define "budgetflow.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.kafka.caSecret.name }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.caSecret.name }}
    items:
      - key: {{ .Values.kafka.caSecret.key }}
        path: {{ .Values.kafka.caSecret.key }}
{{- end }}
{{- if .Values.kafka.clientCertSecret.name }}
- name: kafka-client
  secret:
    secretName: {{ .Values.kafka.clientCertSecret.name }}
    defaultMode: 0400
{{- end }}
{{- if .Values.prices }}
- name: prices
  configMap:
    name: {{ include "budgetflow.fullname" . }}-prices
{{- end }}
{{- end -}}

{{- define "budgetflow.podSpecCommon" -}}
serviceAccountName: {{ include "budgetflow.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "budgetflow.configChecksum" -}}
checksum/config: {{ printf "%s%s%s" (toYaml .Values.prices) (toYaml .Values.settings) (toYaml .Values.kafka) | sha256sum }}
{{- end -}}
