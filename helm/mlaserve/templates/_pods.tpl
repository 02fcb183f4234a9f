{{/* Pod templates of the router and the workers, shared by both deployment modes: a Deployment and a
StatefulSet (statefulset) or the leader and worker templates of one LeaderWorkerSet
(leaderworkerset). Usage: include "mlaserve.workerPod" (dict "root" $ "lws" true) */}}

{{- define "mlaserve.workerPod" -}}
{{- $root := .root -}}
{{- $w := $root.Values.worker -}}
{{- $ranges := include "mlaserve.layerRanges" $root | fromJsonArray -}}
{{- $selector := include "mlaserve.selectorLabels" (dict "root" $root "component" "worker") | fromYaml -}}
{{- $resources := deepCopy (default dict $w.resources) -}}
{{- if eq $w.device "cuda" -}}
{{- $limits := deepCopy (default dict $resources.limits) -}}
{{- $_ := set $limits "nvidia.com/gpu" (int $w.expertShards) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- $affinity := deepCopy (default dict $w.affinity) -}}
{{- if $w.onePodPerNode -}}
{{- /* One stage per node, whichever group it belongs to: the selector has no group label. */ -}}
{{- $anti := deepCopy (default dict $affinity.podAntiAffinity) -}}
{{- $term := dict "labelSelector" (dict "matchLabels" $selector) "topologyKey" "kubernetes.io/hostname" -}}
{{- $_ := set $anti "requiredDuringSchedulingIgnoredDuringExecution" (append (default list $anti.requiredDuringSchedulingIgnoredDuringExecution) $term) -}}
{{- $_ := set $affinity "podAntiAffinity" $anti -}}
{{- end -}}
{{- $service := "mlaserve.internal.v1.Stage" -}}
metadata:
  labels:
    {{- include "mlaserve.labels" (dict "root" $root "component" "worker") | nindent 4 }}
    {{- with $w.podLabels }}{{ toYaml . | nindent 4 }}{{ end }}
  annotations:
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- with $w.podAnnotations }}{{ toYaml . | nindent 4 }}{{ end }}
spec:
  serviceAccountName: {{ include "mlaserve.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext: {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ $w.terminationGracePeriodSeconds }}
  {{- with include "mlaserve.demoInit" (dict "root" $root "image" $root.Values.image.worker) | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  containers:
    - name: worker
      image: {{ include "mlaserve.image" (dict "root" $root "image" $root.Values.image.worker) | quote }}
      imagePullPolicy: {{ $root.Values.image.worker.pullPolicy }}
      {{- if .lws }}
      # The stage is the pod's index in its group minus one (index 0 is the router, the group's
      # leader); its layer range is computed by the chart. Extra arguments (worker.extraArgs) arrive as "$@".
      command:
        - /bin/sh
        - -c
        - |
          case "$WORKER_INDEX" in
          {{- range $i, $r := $ranges }}
            {{ add1 $i }}) layers={{ $r }} ;;
          {{- end }}
            *) echo "mlaserve: pod $POD_NAME (index $WORKER_INDEX in group $GROUP_INDEX) has no stage: groups of this release have {{ len $ranges }} stages" >&2; exit 1 ;;
          esac
          exec mlaserve worker --config /etc/mlaserve/mlaserve.toml --layers "$layers" "$@"
        - mlaserve-worker
      {{- else }}
      # The stage is the pod's ordinal (suffix of its name); its layer range is computed by the
      # chart. Extra arguments (worker.extraArgs) arrive as "$@".
      command:
        - /bin/sh
        - -c
        - |
          stage="${POD_NAME##*-}"
          case "$stage" in
          {{- range $i, $r := $ranges }}
            {{ $i }}) layers={{ $r }} ;;
          {{- end }}
            *) echo "mlaserve: pod $POD_NAME has no stage: this release has {{ len $ranges }} stages" >&2; exit 1 ;;
          esac
          exec mlaserve worker --config /etc/mlaserve/mlaserve.toml --layers "$layers" "$@"
        - mlaserve-worker
      {{- end }}
      {{- with $w.extraArgs }}
      args: {{- toYaml . | nindent 8 }}
      {{- end }}
      env: {{- include "mlaserve.env" (dict "c" $w "lws" .lws "worker" true) | nindent 8 }}
      ports:
        - {name: grpc, containerPort: {{ $w.port }}, protocol: TCP}
        {{- if $root.Values.metrics.enabled }}
        - {name: metrics, containerPort: {{ $root.Values.metrics.port }}, protocol: TCP}
        {{- end }}
      # Probes ask for the stage's own service, NOT_SERVING until its layers are loaded (the overall
      # "" is SERVING at once). The kubelet's gRPC probe speaks plaintext only: with internal TLS
      # grpc_health_probe asks over mutual TLS from inside the pod. Health stays open with a stage token.
      {{- range $probe := list "startupProbe" "readinessProbe" "livenessProbe" }}
      {{ $probe }}:
        {{- if $root.Values.tls.internal.enabled }}
        exec:
          command: ["grpc_health_probe", "-addr=127.0.0.1:{{ $w.port }}", "-service={{ $service }}", "-tls", "-tls-no-verify", "-tls-client-cert=/etc/mlaserve/tls/internal/tls.crt", "-tls-client-key=/etc/mlaserve/tls/internal/tls.key", "-connect-timeout=2s", "-rpc-timeout=2s"]
        {{- else }}
        grpc: {port: {{ $w.port }}, service: {{ $service }}}
        {{- end }}
        {{- toYaml (index $w $probe) | nindent 8 }}
      {{- end }}
      resources: {{- toYaml $resources | nindent 8 }}
      securityContext: {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - {name: config, mountPath: /etc/mlaserve/mlaserve.toml, subPath: mlaserve.toml, readOnly: true}
        - {name: model, mountPath: {{ $root.Values.model.mountPath | quote }}, readOnly: true}
        # HOME and caches (CUDA kernel cache) on a writable volume; the root filesystem is read-only.
        - {name: tmp, mountPath: /tmp}
        {{- if $root.Values.tls.internal.enabled }}
        - {name: tls-internal, mountPath: /etc/mlaserve/tls/internal, readOnly: true}
        {{- end }}
        {{- if eq $root.Values.stageAuth.mode "token" }}
        - {name: stage-token, mountPath: /etc/mlaserve/stage-token, readOnly: true}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "mlaserve.fullname" $root }}
        items: [{key: worker.toml, path: mlaserve.toml}]
    {{- include "mlaserve.modelVolume" $root | nindent 4 }}
    - name: tmp
      emptyDir: {sizeLimit: 8Gi}
    {{- if $root.Values.tls.internal.enabled }}
    - name: tls-internal
      secret: {secretName: {{ $root.Values.tls.internal.workerSecretName | quote }}, defaultMode: 0440}
    {{- end }}
    {{- with include "mlaserve.stageTokenVolume" $root | trim }}{{ . | nindent 4 }}{{ end }}
  {{- with $w.nodeSelector }}
  nodeSelector: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.tolerations }}
  tolerations: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $affinity }}
  affinity: {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* The stage token Secret as a volume (stageAuth.mode=token), the key mounted as the file "token". */}}
{{- define "mlaserve.stageTokenVolume" -}}
{{- if eq .Values.stageAuth.mode "token" }}
- name: stage-token
  secret:
    secretName: {{ include "mlaserve.stageTokenSecret" . | quote }}
    defaultMode: 0440
    items: [{key: {{ .Values.stageAuth.secretKey | quote }}, path: token}]
{{- end }}
{{- end -}}

{{- define "mlaserve.routerPod" -}}
{{- $root := .root -}}
{{- $r := $root.Values.router -}}
{{- $stages := ternary (include "mlaserve.groupStageAddresses" $root) (include "mlaserve.stageAddresses" $root) (not (not .lws)) | fromJsonArray -}}
metadata:
  labels:
    {{- include "mlaserve.labels" (dict "root" $root "component" "router") | nindent 4 }}
    {{- with $r.podLabels }}{{ toYaml . | nindent 4 }}{{ end }}
  annotations:
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- with $r.podAnnotations }}{{ toYaml . | nindent 4 }}{{ end }}
spec:
  serviceAccountName: {{ include "mlaserve.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $r.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext: {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  # Streams get drain_timeout_secs after SIGTERM; leave the process time to exit after that.
  terminationGracePeriodSeconds: {{ add (int (default 30 $r.config.drain_timeout_secs)) 15 }}
  {{- with include "mlaserve.demoInit" (dict "root" $root "image" $root.Values.image.router) | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  containers:
    - name: router
      image: {{ include "mlaserve.image" (dict "root" $root "image" $root.Values.image.router) | quote }}
      imagePullPolicy: {{ $root.Values.image.router.pullPolicy }}
      command: ["mlaserve"]
      {{- if .lws }}
      # The stages of this router's own group, in layer order: <lws>-<group>-<index> under the
      # headless Service the LWS controller creates; the kubelet expands $(GROUP_INDEX).
      {{- end }}
      args:
        - router
        - --config
        - /etc/mlaserve/mlaserve.toml
        {{- range $stages }}
        - --stage
        - {{ . }}
        {{- end }}
        {{- if $r.http.enabled }}
        - --http-listen
        - {{ include "mlaserve.listen" (dict "root" $root "port" $r.http.port) | quote }}
        {{- end }}
        {{- with $r.extraArgs }}{{ toYaml . | nindent 8 }}{{ end }}
      env: {{- include "mlaserve.env" (dict "c" $r "lws" .lws) | nindent 8 }}
      ports:
        - {name: grpc, containerPort: {{ $r.port }}, protocol: TCP}
        {{- if $r.http.enabled }}
        - {name: http, containerPort: {{ $r.http.port }}, protocol: TCP}
        {{- end }}
        {{- if $root.Values.metrics.enabled }}
        - {name: metrics, containerPort: {{ $root.Values.metrics.port }}, protocol: TCP}
        {{- end }}
      startupProbe:
        tcpSocket: {port: grpc}
        periodSeconds: 2
        failureThreshold: 60
      livenessProbe:
        tcpSocket: {port: grpc}
        {{- toYaml $r.livenessProbe | nindent 8 }}
      readinessProbe:
        {{- if $root.Values.tls.public.enabled }}
        # The kubelet's gRPC probe speaks plaintext only; probe over TLS from inside the pod.
        exec:
          command: ["grpc_health_probe", "-addr=127.0.0.1:{{ $r.port }}", "-tls", "-tls-no-verify", "-connect-timeout=2s", "-rpc-timeout=2s"]
        {{- else }}
        grpc: {port: {{ $r.port }}}
        {{- end }}
        {{- toYaml $r.readinessProbe | nindent 8 }}
      resources: {{- toYaml $r.resources | nindent 8 }}
      securityContext: {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - {name: config, mountPath: /etc/mlaserve/mlaserve.toml, subPath: mlaserve.toml, readOnly: true}
        - {name: model, mountPath: {{ $root.Values.model.mountPath | quote }}, readOnly: true}
        - {name: tmp, mountPath: /tmp}
        {{- if $root.Values.tls.public.enabled }}
        - {name: tls-public, mountPath: /etc/mlaserve/tls/public, readOnly: true}
        {{- end }}
        {{- if $root.Values.tls.internal.enabled }}
        - {name: tls-internal, mountPath: /etc/mlaserve/tls/internal, readOnly: true}
        {{- end }}
        {{- if $root.Values.auth.enabled }}
        - {name: auth, mountPath: /etc/mlaserve/auth, readOnly: true}
        {{- end }}
        {{- if eq $root.Values.stageAuth.mode "token" }}
        - {name: stage-token, mountPath: /etc/mlaserve/stage-token, readOnly: true}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "mlaserve.fullname" $root }}
        items: [{key: router.toml, path: mlaserve.toml}]
    {{- include "mlaserve.modelVolume" $root | nindent 4 }}
    - name: tmp
      emptyDir: {sizeLimit: 1Gi}
    {{- if $root.Values.tls.public.enabled }}
    - name: tls-public
      secret: {secretName: {{ $root.Values.tls.public.secretName | quote }}, defaultMode: 0440}
    {{- end }}
    {{- if $root.Values.tls.internal.enabled }}
    - name: tls-internal
      secret: {secretName: {{ $root.Values.tls.internal.routerSecretName | quote }}, defaultMode: 0440}
    {{- end }}
    {{- if $root.Values.auth.enabled }}
    - name: auth
      secret:
        secretName: {{ $root.Values.auth.existingSecret | quote }}
        defaultMode: 0440
        items: [{key: {{ $root.Values.auth.secretKey | quote }}, path: {{ $root.Values.auth.secretKey | quote }}}]
    {{- end }}
    {{- with include "mlaserve.stageTokenVolume" $root | trim }}{{ . | nindent 4 }}{{ end }}
  {{- with $r.nodeSelector }}
  nodeSelector: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $r.tolerations }}
  tolerations: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $r.affinity }}
  affinity: {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
