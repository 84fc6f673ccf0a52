{{/* Names ------------------------------------------------------------------------------------- */}}
{{- define "embedjob.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "embedjob.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include "embedjob.selector" (list . "operator") */}}
{{- define "embedjob.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ $root.Chart.Name }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "embedjob.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "embedjob.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "embedjob.worker.serviceAccountName" -}}
{{- if .Values.worker.serviceAccount.create -}}
{{- default (printf "%s-worker" (include "embedjob.fullname" .)) .Values.worker.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.worker.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "embedjob.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* Name of the Secret holding S3 credentials, or "" when there is none. */}}
{{- define "embedjob.s3.secretName" -}}
{{- if .Values.s3.existingSecret -}}
{{- .Values.s3.existingSecret -}}
{{- else if or .Values.s3.accessKeyId .Values.s3.secretAccessKey -}}
{{- printf "%s-s3" (include "embedjob.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Requests and limits with every quantity a string (see values.yaml). */}}
{{- define "embedjob.resources" -}}
{{- $out := dict -}}
{{- range $kind := list "requests" "limits" -}}
{{- $q := dict -}}
{{- range $name, $v := (get $ $kind | default dict) -}}
{{- $_ := set $q $name (toString $v) -}}
{{- end -}}
{{- if $q -}}{{- $_ := set $out $kind $q -}}{{- end -}}
{{- end -}}
{{- if $out -}}{{- toYaml $out -}}{{- else -}}{}{{- end -}}
{{- end -}}

{{/* Pod annotations: the user's, plus a checksum of a chart-made S3 Secret so pods roll with it. */}}
{{- define "embedjob.podAnnotations" -}}
{{- $root := index . 0 -}}
{{- $a := deepCopy (index . 1 | default dict) -}}
{{- if and (not $root.Values.s3.existingSecret) (include "embedjob.s3.secretName" $root) -}}
{{- $_ := set $a "checksum/s3-secret" (include (print $root.Template.BasePath "/s3-secret.yaml") $root | sha256sum) -}}
{{- end -}}
{{- if $a -}}
annotations:
  {{- toYaml $a | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* Environment shared by the operator and the workers: broker, object store, lease timing. */}}
{{- define "embedjob.commonEnv" -}}
{{- if .Values.redis.enabled -}}
- name: EMBEDJOB_REDIS_URL
  value: {{ printf "redis://%s-redis:%d/0" (include "embedjob.fullname" .) (int .Values.redis.port) | quote }}
{{- else if .Values.redis.existingSecret }}
- name: EMBEDJOB_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- else }}
- name: EMBEDJOB_REDIS_URL
  value: {{ required "redis.url or redis.existingSecret is required when redis.enabled is false" .Values.redis.url | quote }}
{{- end }}
{{- include "embedjob.redis.securityEnv" . }}
{{- include "embedjob.access.env" . }}
{{- with (include "embedjob.s3.secretName" .) }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.worker.leaseSeconds }}
- name: EMBEDJOB_LEASE_SECONDS
  value: {{ . | toString | quote }}
{{- end }}
{{- with .Values.worker.visibilityTimeout }}
- name: EMBEDJOB_VISIBILITY_TIMEOUT
  value: {{ . | toString | quote }}
{{- end }}
# The root filesystem is read-only: anything that writes under $HOME writes to the /tmp emptyDir.
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}


{{/* A pod's annotations plus, with metrics.scrapeAnnotations, the prometheus.io ones:
     include "embedjob.scrapeAnnotations" (list . .Values.x.podAnnotations port) -> YAML (use fromYaml) */}}
{{- define "embedjob.scrapeAnnotations" -}}
{{- $root := index . 0 -}}
{{- $a := deepCopy (index . 1 | default dict) -}}
{{- if and $root.Values.metrics.enabled $root.Values.metrics.scrapeAnnotations -}}
{{- $_ := set $a "prometheus.io/scrape" "true" -}}
{{- $_ := set $a "prometheus.io/port" (index . 2 | toString) -}}
{{- $_ := set $a "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- toYaml $a -}}
{{- end -}}


{{/* Redis security ------------------------------------------------------------------------------ */}}
{{/* Name of the Secret holding the Redis password, or "" when there is none. */}}
{{- define "embedjob.redis.authSecretName" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecret -}}
{{- else if and .Values.redis.enabled .Values.redis.auth.enabled -}}
{{- printf "%s-redis-auth" (include "embedjob.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Where the Redis CA is mounted in the operator and worker pods. */}}
{{- define "embedjob.redis.caDir" -}}/etc/embedjob/redis-ca{{- end -}}

{{- define "embedjob.redis.hasCA" -}}
{{- if or .Values.redis.tls.caSecret .Values.redis.tls.caConfigMap -}}true{{- end -}}
{{- end -}}

{{/* EMBEDJOB_REDIS_PASSWORD (from the Secret) and EMBEDJOB_REDIS_CA_FILE, for the operator and workers. */}}
{{- define "embedjob.redis.securityEnv" -}}
{{- with (include "embedjob.redis.authSecretName" .) }}
- name: EMBEDJOB_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.redis.auth.existingSecretPasswordKey }}
{{- end }}
{{- if (include "embedjob.redis.hasCA" .) }}
- name: EMBEDJOB_REDIS_CA_FILE
  value: {{ printf "%s/%s" (include "embedjob.redis.caDir" .) .Values.redis.tls.caKey | quote }}
{{- end }}
{{- end -}}

{{/* The Redis CA volume mount / volume (empty without a CA): include them in a pod's lists. */}}
{{- define "embedjob.redis.caVolumeMount" -}}
{{- if (include "embedjob.redis.hasCA" .) -}}
- name: redis-ca
  mountPath: {{ include "embedjob.redis.caDir" . }}
  readOnly: true
{{- end -}}
{{- end -}}

{{- define "embedjob.redis.caVolume" -}}
{{- if .Values.redis.tls.caSecret -}}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.tls.caSecret }}
    items:
      - key: {{ .Values.redis.tls.caKey }}
        path: {{ .Values.redis.tls.caKey }}
{{- else if .Values.redis.tls.caConfigMap -}}
- name: redis-ca
  configMap:
    name: {{ .Values.redis.tls.caConfigMap }}
    items:
      - key: {{ .Values.redis.tls.caKey }}
        path: {{ .Values.redis.tls.caKey }}
{{- end -}}
{{- end -}}

{{/* Storage policy ---------------------------------------------------------------------------------- */}}
{{/* The allow-list the programs get (JSON): storageAllowList plus, for storageNamespaceBuckets, a "*"
     entry s3://<bucket>/{namespace}/ per bucket. Fails closed: watching every namespace without a
     policy does not render. One watched namespace without a policy: the opt-out {"*": ["*"]}. */}}
{{- define "embedjob.access.allowList" -}}
{{- $allow := deepCopy (.Values.storageAllowList | default dict) -}}
{{- if .Values.storageNamespaceBuckets -}}
{{- $star := get $allow "*" | default list -}}
{{- range .Values.storageNamespaceBuckets -}}
{{- $star = append $star (printf "s3://%s/{namespace}/" .) -}}
{{- end -}}
{{- $_ := set $allow "*" $star -}}
{{- end -}}
{{- if not $allow -}}
{{- if .Values.operator.watchNamespace -}}
{{- $_ := set $allow "*" (list "*") -}}
{{- else -}}
{{- fail "a storage policy is required when operator.watchNamespace is \"\" (every namespace): set storageNamespaceBuckets (each namespace gets s3://<bucket>/<namespace>/), or storageAllowList (namespace or \"*\" -> s3:// prefixes), or the explicit opt-out storageAllowList={\"*\":[\"*\"]} (any S3 location). See the README, \"Storage policy\"" -}}
{{- end -}}
{{- end -}}
{{- toJson $allow -}}
{{- end -}}

{{/* Operator and workers: the storage policy, the admin's ceilings and model allow-list, and no local
     paths (a pod has no business reading its own filesystem for a job; the model cache stays allowed
     for model.path, see embedjob.access). */}}
{{- define "embedjob.access.env" }}
- name: EMBEDJOB_STORAGE_ALLOW_LIST
  value: {{ include "embedjob.access.allowList" . | quote }}
{{- with .Values.storageEndpoints }}
- name: EMBEDJOB_STORAGE_ENDPOINTS
  value: {{ join "," . | quote }}
{{- end }}
- name: EMBEDJOB_ALLOW_LOCAL_PATHS
  value: "false"
- name: EMBEDJOB_MAX_SHARDS
  value: {{ .Values.limits.maxShards | int64 | toString | quote }}
- name: EMBEDJOB_MAX_MANIFEST_BYTES
  value: {{ .Values.limits.maxManifestBytes | int64 | toString | quote }}
- name: EMBEDJOB_MAX_IMAGE_PIXELS
  value: {{ .Values.limits.maxImagePixels | int64 | toString | quote }}
- name: EMBEDJOB_MAX_NUM_THREADS
  value: {{ include "embedjob.maxNumThreads" . | quote }}
- name: EMBEDJOB_MAX_RETRIES
  value: {{ .Values.limits.maxRetries | int64 | toString | quote }}
- name: EMBEDJOB_MAX_PRIORITY
  value: {{ .Values.limits.maxPriority | int64 | toString | quote }}
- name: EMBEDJOB_MAX_TAR_HEADER_BYTES
  value: {{ .Values.limits.maxTarHeaderBytes | int64 | toString | quote }}
- name: EMBEDJOB_MAX_SIDECAR_BYTES
  value: {{ .Values.limits.maxSidecarBytes | int64 | toString | quote }}
- name: EMBEDJOB_MAX_METADATA_BYTES
  value: {{ .Values.limits.maxMetadataBytes | int64 | toString | quote }}
{{- with .Values.models.allowList }}
- name: EMBEDJOB_MODEL_ALLOW_LIST
  value: {{ toJson . | quote }}
{{- end }}
{{- end -}}

{{/* limits.maxNumThreads, or the worker's CPU request in whole CPUs ("4", "3500m" -> 3), at least 1. */}}
{{- define "embedjob.maxNumThreads" -}}
{{- if .Values.limits.maxNumThreads -}}
{{- .Values.limits.maxNumThreads | int64 | toString -}}
{{- else -}}
{{- $cpu := toString (dig "requests" "cpu" "" (.Values.worker.resources | default dict)) -}}
{{- $n := 0 -}}
{{- if hasSuffix "m" $cpu -}}
{{- $n = div (trimSuffix "m" $cpu | int64) 1000 -}}
{{- else if $cpu -}}
{{- $n = $cpu | float64 | floor | int64 -}}
{{- else -}}
{{- $n = 64 -}}
{{- end -}}
{{- max $n 1 | toString -}}
{{- end -}}
{{- end -}}
