{{/* Names. DNS labels are 63 characters at most. */}}
{{- define "mlaserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mlaserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mlaserve.routerName" -}}
{{- printf "%s-router" (include "mlaserve.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{/* StatefulSet and headless Service. Short enough for "<name>-<ordinal>" hostnames and the
controller-revision-hash label ("<name>-<10 char hash>"). */}}
{{- define "mlaserve.workerName" -}}
{{- printf "%s-worker" (include "mlaserve.fullname" . | trunc 45 | trimSuffix "-") -}}
{{- end -}}

{{/* leaderworkerset mode: the LeaderWorkerSet, also the name of the headless Service the LWS
controller creates (pods: <name>-<group> for the router, <name>-<group>-<index> for the stages).
DNS-1035 (starts with a letter) and short enough for the controller-revision-hash label of the
per-group worker StatefulSet ("<name>-<group>-<10 char hash>"). */}}
{{- define "mlaserve.lwsName" -}}
{{- include "mlaserve.fullname" . | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "mlaserve.lws" -}}
{{- if eq .Values.deployment.mode "leaderworkerset" }}true{{ end -}}
{{- end -}}

{{- define "mlaserve.stageTokenSecret" -}}
{{- default (printf "%s-stage-token" (include "mlaserve.fullname" . | trunc 50 | trimSuffix "-")) .Values.stageAuth.existingSecret -}}
{{- end -}}

{{- define "mlaserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mlaserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mlaserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Usage: include "mlaserve.labels" (dict "root" $ "component" "worker") */}}
{{- define "mlaserve.labels" -}}
helm.sh/chart: {{ include "mlaserve.chart" .root }}
{{ include "mlaserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: mlaserve
{{- end -}}

{{- define "mlaserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mlaserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mlaserve.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* "host:port" to listen on; IPv6 hosts get brackets. */}}
{{- define "mlaserve.listen" -}}
{{- $host := .root.Values.listenHost -}}
{{- if contains ":" $host -}}
{{- printf "[%s]:%d" $host (int .port) -}}
{{- else -}}
{{- printf "%s:%d" $host (int .port) -}}
{{- end -}}
{{- end -}}

{{- define "mlaserve.modelDir" -}}
{{- if eq .Values.model.source "demo" -}}
{{- printf "%s/demo" (.Values.model.mountPath | trimSuffix "/") -}}
{{- else if .Values.model.path -}}
{{- printf "%s/%s" (.Values.model.mountPath | trimSuffix "/") (.Values.model.path | trimPrefix "/") -}}
{{- else -}}
{{- .Values.model.mountPath -}}
{{- end -}}
{{- end -}}

{{/* Layer range of every stage, as a JSON list of "START..END". Explicit worker.layers are
checked to be contiguous and to cover the model exactly; otherwise the layers are split evenly,
the first (numHiddenLayers mod stages) stages taking one more. */}}
{{- define "mlaserve.layerRanges" -}}
{{- $total := int .Values.model.numHiddenLayers -}}
{{- $stages := int .Values.worker.stages -}}
{{- $ranges := list -}}
{{- if .Values.worker.layers -}}
  {{- if ne (len .Values.worker.layers) $stages -}}
    {{- fail (printf "worker.layers has %d ranges but worker.stages is %d" (len .Values.worker.layers) $stages) -}}
  {{- end -}}
  {{- $next := 0 -}}
  {{- range $i, $r := .Values.worker.layers -}}
    {{- $parts := splitList ".." $r -}}
    {{- $start := atoi (index $parts 0) -}}
    {{- $end := atoi (index $parts 1) -}}
    {{- if ne $start $next -}}
      {{- fail (printf "worker.layers[%d] is %q: it must start at layer %d (ranges are contiguous, from 0)" $i $r $next) -}}
    {{- end -}}
    {{- if le $end $start -}}
      {{- fail (printf "worker.layers[%d] is %q: an empty range" $i $r) -}}
    {{- end -}}
    {{- $next = $end -}}
    {{- $ranges = append $ranges (printf "%d..%d" $start $end) -}}
  {{- end -}}
  {{- if ne $next $total -}}
    {{- fail (printf "worker.layers end at layer %d but model.numHiddenLayers is %d" $next $total) -}}
  {{- end -}}
{{- else -}}
  {{- if gt $stages $total -}}
    {{- fail (printf "worker.stages (%d) exceeds model.numHiddenLayers (%d): every stage needs a layer" $stages $total) -}}
  {{- end -}}
  {{- $base := div $total $stages -}}
  {{- $extra := mod $total $stages -}}
  {{- $start := 0 -}}
  {{- range $i := until $stages -}}
    {{- $n := $base -}}
    {{- if lt $i (int $extra) -}}{{- $n = add1 $n -}}{{- end -}}
    {{- $ranges = append $ranges (printf "%d..%d" $start (add $start $n)) -}}
    {{- $start = add $start $n -}}
  {{- end -}}
{{- end -}}
{{- toJson $ranges -}}
{{- end -}}

{{/* Stage addresses in layer order: each worker pod's stable DNS name under the headless Service. */}}
{{- define "mlaserve.stageAddresses" -}}
{{- $worker := include "mlaserve.workerName" . -}}
{{- $suffix := ternary (printf "svc.%s" .Values.clusterDomain) "svc" (ne .Values.clusterDomain "") -}}
{{- $addrs := list -}}
{{- range $i := until (int .Values.worker.stages) -}}
{{- $addrs = append $addrs (printf "%s-%d.%s.%s.%s:%d" $worker $i $worker $.Release.Namespace $suffix (int $.Values.worker.port)) -}}
{{- end -}}
{{- toJson $addrs -}}
{{- end -}}

{{/* leaderworkerset mode: the stage addresses of the router's own group, in layer order. Stage i is
worker index i+1 of the group; $(GROUP_INDEX) is the pod's leaderworkerset.sigs.k8s.io/group-index
label (downward API), expanded by the kubelet in the container's args. */}}
{{- define "mlaserve.groupStageAddresses" -}}
{{- $lws := include "mlaserve.lwsName" . -}}
{{- $suffix := ternary (printf "svc.%s" .Values.clusterDomain) "svc" (ne .Values.clusterDomain "") -}}
{{- $addrs := list -}}
{{- range $i := until (int .Values.worker.stages) -}}
{{- $addrs = append $addrs (printf "%s-$(GROUP_INDEX)-%d.%s.%s.%s:%d" $lws (add1 $i) $lws $.Release.Namespace $suffix (int $.Values.worker.port)) -}}
{{- end -}}
{{- toJson $addrs -}}
{{- end -}}

{{/* "k=v,k=v" from telemetry.resourceAttributes, sorted by key. */}}
{{- define "mlaserve.resourceAttributes" -}}
{{- $pairs := list -}}
{{- range $k, $v := .Values.telemetry.resourceAttributes -}}
{{- $pairs = append $pairs (printf "%s=%s" $k (toString $v)) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* Checks across values that the schema cannot express. */}}
{{- define "mlaserve.validate" -}}
{{- $w := .Values.worker -}}
{{- if and (eq $w.device "cuda") (gt (int $w.expertShards) (int $w.gpusPerNode)) -}}
{{- fail (printf "worker.expertShards (%d) exceeds worker.gpusPerNode (%d): a stage's expert shards must fit on one node" (int $w.expertShards) (int $w.gpusPerNode)) -}}
{{- end -}}
{{- if and (eq $w.device "cpu") (gt (int $w.expertShards) 1) -}}
{{- fail "worker.expertShards must be 1 with worker.device=cpu: shards are separate GPUs" -}}
{{- end -}}
{{- if .Values.metrics.enabled -}}
{{- if or (eq (int .Values.metrics.port) (int .Values.router.port)) (eq (int .Values.metrics.port) (int $w.port)) -}}
{{- fail (printf "metrics.port (%d) collides with router.port or worker.port" (int .Values.metrics.port)) -}}
{{- end -}}
{{- end -}}
{{- $http := .Values.router.http -}}
{{- if $http.enabled -}}
{{- if or (eq (int $http.port) (int .Values.router.port)) (and .Values.metrics.enabled (eq (int $http.port) (int .Values.metrics.port))) -}}
{{- fail (printf "router.http.port (%d) collides with router.port or metrics.port" (int $http.port)) -}}
{{- end -}}
{{- end -}}
{{- $cfg := .Values.router.config -}}
{{- if and (hasKey $cfg "default_max_new_tokens") (hasKey $cfg "max_new_tokens") -}}
{{- if gt (int $cfg.default_max_new_tokens) (int $cfg.max_new_tokens) -}}
{{- fail "router.config.default_max_new_tokens exceeds router.config.max_new_tokens" -}}
{{- end -}}
{{- end -}}
{{- $_ := include "mlaserve.layerRanges" . -}}
{{- $d := .Values.deployment -}}
{{- if include "mlaserve.lws" . -}}
{{- if not (regexMatch "^[a-z]" (include "mlaserve.lwsName" .)) -}}
{{- fail (printf "deployment.mode=leaderworkerset: the LeaderWorkerSet name %q must start with a letter (DNS-1035): set fullnameOverride" (include "mlaserve.lwsName" .)) -}}
{{- end -}}
{{- if and (has (toString $d.rollingUpdate.maxUnavailable) (list "0" "0%")) (has (toString $d.rollingUpdate.maxSurge) (list "0" "0%")) -}}
{{- fail "deployment.rollingUpdate: maxUnavailable and maxSurge cannot both be 0 (no group could ever be updated)" -}}
{{- end -}}
{{- if and $d.stagesPerDomain (ne (mod (int $w.stages) (int $d.stagesPerDomain)) 0) -}}
{{- fail (printf "deployment.stagesPerDomain (%d) must divide worker.stages (%d): each domain holds whole subgroups of stages" (int $d.stagesPerDomain) (int $w.stages)) -}}
{{- end -}}
{{- if and $d.stagesPerDomain (or (not $d.topologyKey) (eq $d.topologyScope "group")) -}}
{{- fail "deployment.stagesPerDomain needs deployment.topologyKey with deployment.topologyScope=workers" -}}
{{- end -}}
{{- else -}}
{{- if ne (int $d.replicas) 1 -}}
{{- fail (printf "deployment.replicas is %d but deployment.mode is statefulset (one pipeline): use deployment.mode=leaderworkerset for replicated pipelines" (int $d.replicas)) -}}
{{- end -}}
{{- if $d.topologyKey -}}
{{- fail "deployment.topologyKey needs deployment.mode=leaderworkerset" -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.stageAuth.mode "tls") (not .Values.tls.internal.enabled) -}}
{{- fail "stageAuth.mode=tls closes the stages with mutual TLS: enable tls.internal (with its Secrets)" -}}
{{- end -}}
{{- end -}}

{{/* "key = value" lines of a map, sorted; JSON strings, numbers and booleans are valid TOML. */}}
{{- define "mlaserve.tomlKeys" -}}
{{- $lines := list -}}
{{- range $k, $v := . -}}
{{- $lines = append $lines (printf "%s = %s" $k (toJson $v)) -}}
{{- end -}}
{{- join "\n" $lines -}}
{{- end -}}

{{/* Environment shared by router and workers: pod identity for telemetry and threads; in
leaderworkerset mode the group (and, for workers, the index in the group) from the labels the LWS
webhook puts on every pod. Usage: include "mlaserve.env" (dict "c" .Values.worker "lws" true "worker" true) */}}
{{- define "mlaserve.env" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
{{- if .lws }}
- name: GROUP_INDEX
  valueFrom: {fieldRef: {fieldPath: "metadata.labels['leaderworkerset.sigs.k8s.io/group-index']"}}
{{- if .worker }}
- name: WORKER_INDEX
  valueFrom: {fieldRef: {fieldPath: "metadata.labels['leaderworkerset.sigs.k8s.io/worker-index']"}}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME),k8s.node.name=$(NODE_NAME),mlaserve.group=$(GROUP_INDEX)"
{{- else }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME),k8s.node.name=$(NODE_NAME)"
{{- end }}
{{- if .c.threads }}
- name: MLASERVE_THREADS
  value: {{ .c.threads | quote }}
{{- end }}
{{- with .c.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The model volume (the same source for router and workers). */}}
{{- define "mlaserve.modelVolume" -}}
- name: model
{{- $m := .Values.model }}
{{- if eq $m.source "existingClaim" }}
  persistentVolumeClaim: {claimName: {{ $m.existingClaim | quote }}, readOnly: true}
{{- else if eq $m.source "pvc" }}
  persistentVolumeClaim: {claimName: {{ printf "%s-model" (include "mlaserve.fullname" .) | quote }}, readOnly: true}
{{- else if eq $m.source "hostPath" }}
  hostPath: {path: {{ $m.hostPath | quote }}, type: Directory}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{/* Demo source: build the (deterministic) random demo model into the model volume. */}}
{{- define "mlaserve.demoInit" -}}
{{- if eq .root.Values.model.source "demo" }}
initContainers:
  - name: demo-model
    image: {{ include "mlaserve.image" (dict "root" .root "image" .image) | quote }}
    imagePullPolicy: {{ .image.pullPolicy }}
    command: ["/bin/sh", "-c", "ln -sfn \"$(mlaserve demo-model)\" {{ include "mlaserve.modelDir" .root }}"]
    env:
      - name: MLASERVE_CACHE
        value: {{ .root.Values.model.mountPath | quote }}
    securityContext: {{- toYaml .root.Values.securityContext | nindent 6 }}
    volumeMounts:
      - {name: model, mountPath: {{ .root.Values.model.mountPath | quote }}}
      - {name: tmp, mountPath: /tmp}
{{- end }}
{{- end -}}
