{{/* Names, labels and the values every template derives from the same place. */}}

{{- define "blendgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "blendgate.fullname" -}}
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

{{- define "blendgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "blendgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include with (list $ "gateway"). */}}
{{- define "blendgate.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "blendgate.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "blendgate.gatewayImage" -}}
{{- printf "%s:%s" .Values.gateway.image.repository (default .Chart.AppVersion .Values.gateway.image.tag) }}
{{- end }}

{{- define "blendgate.sglangImage" -}}
{{- printf "%s:%s" .Values.sglang.image.repository (default .Chart.AppVersion .Values.sglang.image.tag) }}
{{- end }}

{{- define "blendgate.secretName" -}}
{{- default (printf "%s-keys" (include "blendgate.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* Whether the gateway has an admin key. */}}
{{- define "blendgate.hasAdminKey" -}}
{{- if or .Values.auth.adminKey (and .Values.auth.existingSecret .Values.auth.adminKeyInExistingSecret) }}true{{ end }}
{{- end }}

{{/* The environment variable holding a tenant's client key: BLENDGATE_KEY_<NAME>, non-alphanumerics as _. */}}
{{- define "blendgate.tenantKeyEnv" -}}
{{- printf "BLENDGATE_KEY_%s" (regexReplaceAll "[^A-Z0-9]" (upper .) "_") }}
{{- end }}

{{/* The Redis URL written into the ConfigMap; empty when it comes from a Secret (then the environment). */}}
{{- define "blendgate.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s-redis:6379/0" (include "blendgate.fullname" .) }}
{{- else if not .Values.redis.external.existingSecret }}
{{- .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* Whether the gateway and the workers have a Redis at all. */}}
{{- define "blendgate.hasRedis" -}}
{{- if or .Values.redis.enabled .Values.redis.external.url .Values.redis.external.existingSecret }}true{{ end }}
{{- end }}

{{/* The SGLang workers' stable URLs, one per StatefulSet replica, as a JSON list. */}}
{{- define "blendgate.sglangWorkers" -}}
{{- $full := include "blendgate.fullname" . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.sglang.replicas) -}}
{{- $urls = append $urls (printf "http://%s-sglang-%d.%s-sglang.%s.svc.%s:%d" $full $i $full $.Release.Namespace $.Values.clusterDomain (int $.Values.sglang.port)) -}}
{{- end -}}
{{- toJson $urls -}}
{{- end }}

{{/* The gateway's YAML configuration (gateway/config.py's Settings): gateway.config with what the chart owns. */}}
{{- define "blendgate.gatewayConfig" -}}
{{- $config := deepCopy .Values.gateway.config -}}
{{- $_ := set $config "host" "0.0.0.0" -}}
{{- $_ = set $config "port" (int .Values.gateway.port) -}}
{{- $_ = set $config "cache_dir" "/var/cache/blendgate" -}}
{{- $_ = set $config "shutdown" (dict "drain_delay_s" .Values.gateway.shutdown.drainDelaySeconds "grace_s" .Values.gateway.shutdown.graceSeconds) -}}
{{- $models := list -}}
{{- range .Values.gateway.models -}}
{{- $models = append $models (deepCopy .) -}}
{{- end -}}
{{- if .Values.sglang.enabled -}}
{{- $model := deepCopy .Values.sglang.gatewayModel -}}
{{- $_ = set $model "backend" "sglang" -}}
{{- $_ = set $model "workers" (include "blendgate.sglangWorkers" . | fromJsonArray) -}}
{{- $models = append $models $model -}}
{{- end -}}
{{- if not $models -}}
{{- fail "no models: give gateway.models, or enable sglang (the gateway needs at least one model)" -}}
{{- end -}}
{{- $_ = set $config "models" $models -}}
{{- $retrieval := get $config "retrieval" | default (dict) -}}
{{- $_ = set $retrieval "data_dir" "/var/lib/blendgate" -}}
{{- $_ = set $config "retrieval" $retrieval -}}
{{- $chunk := get $config "chunk_cache" | default (dict) -}}
{{- $_ = set $chunk "disk_dir" "/var/cache/blendgate/chunk-kv" -}}
{{- $semantic := get $config "semantic_cache" | default (dict) -}}
{{- $url := include "blendgate.redisUrl" . -}}
{{- if $url -}}
{{- $_ = set $semantic "redis_url" $url -}}
{{- if .Values.redis.chunkCacheTier -}}
{{- $tier := get $chunk "redis" | default (dict) -}}
{{- $_ = set $tier "url" $url -}}
{{- $_ = set $chunk "redis" $tier -}}
{{- end -}}
{{- end -}}
{{- $_ = set $config "chunk_cache" $chunk -}}
{{- $_ = set $config "semantic_cache" $semantic -}}
{{- $keys := list -}}
{{- range .Values.auth.tenants -}}
{{- $keys = append $keys (dict "key_env" (include "blendgate.tenantKeyEnv" .name) "tenant" .name) -}}
{{- end -}}
{{- if $keys -}}
{{- $_ = set $config "api_keys" $keys -}}
{{- end -}}
{{- if include "blendgate.hasAdminKey" . -}}
{{- $_ = set $config "admin_key_env" "BLENDGATE_ADMIN_KEY" -}}
{{- end -}}
{{- toYaml $config -}}
{{- end }}

{{/* The gateway container's environment: keys from the Secret, a Redis URL from its Secret, extraEnv. */}}
{{- define "blendgate.gatewayEnv" -}}
{{- $secret := include "blendgate.secretName" . -}}
{{- if include "blendgate.hasAdminKey" . }}
- name: BLENDGATE_ADMIN_KEY
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: admin-key}
{{- end }}
{{- range .Values.auth.tenants }}
- name: {{ include "blendgate.tenantKeyEnv" .name }}
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: {{ printf "tenant-%s" .name | quote }}}
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.redis.external.existingSecret }}
{{- /* The URL holds a password: from its Secret, over the ConfigMap (the environment wins over the file). */}}
- name: BLENDGATE_SEMANTIC_CACHE__REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.redis.external.existingSecret }}, key: {{ .Values.redis.external.existingSecretKey }}}
{{- if .Values.redis.chunkCacheTier }}
- name: BLENDGATE_CHUNK_CACHE__REDIS__URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.redis.external.existingSecret }}, key: {{ .Values.redis.external.existingSecretKey }}}
{{- end }}
{{- end }}
{{- with .Values.gateway.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
