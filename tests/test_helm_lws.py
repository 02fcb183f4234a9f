"""The chart's leaderworkerset mode (replicated pipelines as LeaderWorkerSet groups), closed stages in
both modes, and the example topologies under deploy/.

The LeaderWorkerSet object has no built-in schema: it is checked against tests/schemas/
leaderworkerset-v1.json (written from the LWS v1 API types, v0.7.0) plus the LWS webhook's rules a
schema cannot express, and its two pod templates against the Kubernetes schemas (as v1 PodTemplates).
The pods the LWS controller would create are simulated the way its webhook builds them (names
<lws>-<group>[-<index>], the group-index / worker-index labels, LWS_* environment, hostname and
subdomain) and their commands run against the real binary with `--check`, after the kubelet's
$(VAR) expansion.
"""

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, CUDA_BIN, ROOT
from test_helm import (CHART, DEFAULTS, DEPLOY, FULL, KUBE_VERSIONS, NS, RELEASE, ROUTER, STAGE_SERVICE, WORKER,
                       PodSandbox, assert_files_exist, by_kind, checked_settings, containers, expected_ranges, flag, helm,
                       helm_run, http_get, http_listen, loopback_http, merged, need_stage_token, one, port_of, render, start,
                       stop, wait_serving)

assert helm  # the session fixture, imported for pytest

SCHEMA = json.loads((ROOT / "tests" / "schemas" / "leaderworkerset-v1.json").read_text())
LWS = FULL  # the LeaderWorkerSet (and its headless Service): the release's full name
GROUP, INDEX = "leaderworkerset.sigs.k8s.io/group-index", "leaderworkerset.sigs.k8s.io/worker-index"
LWS_MODE = {"deployment": {"mode": "leaderworkerset"}}
TLS_INTERNAL = {"tls": {"internal": {"enabled": True, "workerSecretName": "worker-tls", "routerSecretName": "router-tls"}}}
EXAMPLES = {f"deploy/{p.stem}": yaml.safe_load(p.read_text()) for p in sorted(DEPLOY.glob("values-*.yaml"))}
CASES = {
    "lws-defaults": LWS_MODE,
    "lws-3-groups": merged(LWS_MODE, {"deployment": {"replicas": 3}}),
    "lws-2-groups-3-stages-explicit-rack-mtls": merged(merged(LWS_MODE, TLS_INTERNAL), {
        "deployment": {"replicas": 2, "topologyKey": "example.com/rack"},
        "worker": {"stages": 3, "layers": ["0..20", "20..41", "41..61"], "expertShards": 4},
        "stageAuth": {"mode": "tls"}, "clusterDomain": "cluster.local"}),
    "lws-2-groups-4-stages-2-per-domain-no-metrics-no-http": merged(LWS_MODE, {
        "deployment": {"replicas": 2, "topologyKey": "cloud.google.com/gke-nodepool", "stagesPerDomain": 2,
                       "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "worker": {"stages": 4}, "metrics": {"enabled": False}, "router": {"http": {"enabled": False}},
        "stageAuth": {"existingSecret": "my-token", "secretKey": "t"}}),
    "lws-group-scope-cpu-no-auth": merged(LWS_MODE, {
        "deployment": {"replicas": 2, "topologyKey": "topology.kubernetes.io/zone", "topologyScope": "group"},
        "model": {"source": "demo", "numHiddenLayers": 4}, "image": {"worker": {"repository": "mlaserve-router"}},
        "worker": {"stages": 2, "device": "cpu", "expertShards": 1, "onePodPerNode": False, "tolerations": []},
        "stageAuth": {"mode": "none"}}),
    **{f"ci/{p.stem}": yaml.safe_load(p.read_text()) for p in sorted((CHART / "ci").glob("*.yaml"))
       if yaml.safe_load(p.read_text()).get("deployment", {}).get("mode") == "leaderworkerset"},
    **EXAMPLES,
}


def values_of(case):
    return merged(DEFAULTS, CASES[case])


# ---------------------------------------------------------------------------------------------------
# What the LWS controller and its webhooks make of the object


def webhook_errors(obj) -> list[str]:
    """The LWS v0.7.0 webhook rules (pkg/webhooks/leaderworkerset_webhook.go) beyond the schema."""
    spec, errors = obj["spec"], []
    lwt = spec["leaderWorkerTemplate"]
    size = lwt.get("size", 1)
    sub = lwt.get("subGroupPolicy")
    if sub:
        s = sub["subGroupSize"]
        if size % s and (size - 1) % s:
            errors.append("size or size - 1 must be divisible by subGroupSize")
        if s > size:
            errors.append("subGroupSize cannot be larger than size")
        if sub.get("subGroupPolicyType") == "LeaderExcluded" and (size - 1) % s:
            errors.append("size-1 must be divisible by subGroupSize when using LeaderExcluded")
    if spec.get("replicas", 1) * size > 2**31 - 1:
        errors.append("the product of replicas and size must not exceed MaxInt32")
    return errors


def schema_errors(obj) -> list[str]:
    import jsonschema

    v = jsonschema.Draft7Validator(SCHEMA)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]
    return errors or webhook_errors(obj)  # the API server checks the schema before the webhook runs


def lws_pods(docs):
    """(pod name, role, group, worker index, pod template) of every pod of every group, as the
    controller names them and the pod webhook labels them (pod_utils.AddLWSVariables, pod_webhook.go)."""
    obj = one(docs, "LeaderWorkerSet")
    name, spec = obj["metadata"]["name"], obj["spec"]
    lwt = spec["leaderWorkerTemplate"]
    size = lwt.get("size", 1)
    for g in range(spec.get("replicas", 1)):
        for i in range(size):
            tpl = copy.deepcopy(lwt["leaderTemplate"] if i == 0 and "leaderTemplate" in lwt else lwt["workerTemplate"])
            pod = f"{name}-{g}" if i == 0 else f"{name}-{g}-{i}"
            tpl["metadata"].setdefault("labels", {}).update(
                {"leaderworkerset.sigs.k8s.io/name": name, GROUP: str(g), INDEX: str(i)})
            tpl["spec"].update(hostname=pod, subdomain=name)
            injected = [{"name": "LWS_LEADER_ADDRESS", "value": f"{name}-{g}.{name}.{NS}"},
                        {"name": "LWS_GROUP_SIZE", "value": str(size)}, {"name": "LWS_WORKER_INDEX", "value": str(i)}]
            for c in containers(tpl):
                c["env"] = injected + [e for e in c.get("env", []) if e["name"] not in {x["name"] for x in injected}]
            yield pod, "router" if i == 0 else "worker", g, i, tpl


def pod_dns(tpl, v):
    domain = f"svc.{v['clusterDomain']}" if v["clusterDomain"] else "svc"
    return f"{tpl['spec']['hostname']}.{tpl['spec']['subdomain']}.{NS}.{domain}"


class LwsSandbox(PodSandbox):
    """PodSandbox plus what a LWS pod has: label fieldRefs, and the kubelet's $(VAR) expansion in
    command and args (only variables of the container's env; $$ escapes)."""

    def __init__(self, root, pod, template, docs):
        super().__init__(root, pod, template, docs)
        self.labels = template["metadata"]["labels"]

    def env(self, container, extra=None):
        env = {"PATH": f"{self.shims}:/usr/bin:/bin", "HOME": f"{self.root}/tmp", "MLASERVE_CACHE": f"{self.root}/tmp/mlaserve",
               "RUST_BACKTRACE": "0"}
        declared = {}
        for e in container.get("env", []):
            if "value" in e:
                declared[e["name"]] = expand(self.rebase(e["value"]), declared)
            else:
                path = e["valueFrom"]["fieldRef"]["fieldPath"]
                label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
                declared[e["name"]] = self.labels[label.group(1)] if label else \
                    {"metadata.name": self.pod, "metadata.namespace": NS, "spec.nodeName": "node-1"}[path]
        return {**env, **declared, **(extra or {})}

    def argv(self, container, check):
        declared = self.env(container)
        return [expand(a, declared) for a in super().argv(container, check)]


def expand(s: str, env: dict) -> str:
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


# ---------------------------------------------------------------------------------------------------
# Lint, schemas


@pytest.mark.parametrize("case", CASES)
def test_lint_strict(helm, case, tmp_path):
    p = helm_run(helm, ["lint", "--strict", str(CHART)], CASES[case], tmp_path)
    assert "0 chart(s) failed" in p.stdout, p.stdout


@pytest.mark.parametrize("case", CASES)
def test_objects_validate(helm, case, tmp_path):
    """Built-in objects against the Kubernetes schemas (strict); the LeaderWorkerSet against ours, its
    pod templates as v1 PodTemplates."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    for kube in KUBE_VERSIONS:
        docs = render(helm, CASES[case], tmp_path, "--kube-version", kube)
        assert not by_kind(docs, "StatefulSet") and not by_kind(docs, "Deployment")
        (lws,) = by_kind(docs, "LeaderWorkerSet")
        assert schema_errors(lws) == []
        lwt = lws["spec"]["leaderWorkerTemplate"]
        templates = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{role}-template"}, "template": lwt[role]}
                     for role in ("leaderTemplate", "workerTemplate")]
        for d in [d for d in docs if d is not lws] + templates:
            try:
                kubernetes_validate.validate(d, kube, strict=True)
            except SchemaNotFoundError:
                assert (d["apiVersion"], d["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor"), d["kind"]
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{d['kind']}/{d['metadata']['name']} (k8s {kube}): "
                                     f"{'.'.join(map(str, e.path))}: {e.message}") from None


def _set(obj, path, value):
    *head, last = path.split(".")
    for k in head:
        obj = obj[k]
    if value is KeyError:
        del obj[last]
    else:
        obj[last] = value


INVALID = [
    ("spec.startupPolicy", "LeaderStarted"),
    ("spec.leaderWorkerTemplate.size", 0),
    ("spec.replicas", -1),
    ("spec.leaderWorkerTemplate.restartPolicy", "Always"),
    ("spec.leaderWorkerTemplate.workerTemplate", KeyError),
    ("spec.leaderWorkerTemplate.sizee", 3),
    ("spec.leaderWorkerTemplate.subGroupPolicy", {"subGroupSize": 0}),
    ("spec.leaderWorkerTemplate.subGroupPolicy", {"subGroupSize": 2, "subGroupPolicyType": "LeaderIncluded"}),
    ("spec.leaderWorkerTemplate.subGroupPolicy", {"subGroupSize": 2, "subGroupPolicyType": "LeaderExcluded"}),  # size 4
    ("spec.leaderWorkerTemplate.subGroupPolicy", {"subGroupSize": 5}),
    ("spec.rolloutStrategy.rollingUpdateConfiguration", {"maxUnavailable": 0, "maxSurge": 0}),
    ("spec.rolloutStrategy.rollingUpdateConfiguration", {"maxUnavailable": "150%"}),
    ("spec.rolloutStrategy.type", "Recreate"),
    ("spec.networkConfig", {"subdomainPolicy": "PerPod"}),
    ("metadata.name", "1-ds3"),
    ("metadata.annotations", {"leaderworkerset.sigs.k8s.io/subgroup-exclusive-topology": "example.com/rack"}),
    ("kind", "LeaderWorkerSets"),
    ("apiVersion", "leaderworkerset.x-k8s.io/v1alpha1"),
]


@pytest.mark.parametrize("path,value", INVALID, ids=[f"{p}={v}" for p, v in INVALID])
def test_lws_schema_rejects_invalid_objects(helm, path, value, tmp_path):
    docs = render(helm, merged(LWS_MODE, {"worker": {"stages": 3}}), tmp_path)
    lws = one(docs, "LeaderWorkerSet")
    assert schema_errors(lws) == [], "the rendered object itself is valid"
    bad = copy.deepcopy(lws)
    _set(bad, path, value)
    assert schema_errors(bad), f"accepted {path}={value!r}"


REJECTED = [
    ({"deployment": {"mode": "lws"}}, "at '/deployment/mode'"),
    ({"deployment": {"replicas": 2}}, "deployment.replicas is 2 but deployment.mode is statefulset"),
    ({"deployment": {"topologyKey": "example.com/rack"}}, "deployment.topologyKey needs deployment.mode=leaderworkerset"),
    ({**LWS_MODE, "worker": {"stages": 3}, "deployment": {"mode": "leaderworkerset", "topologyKey": "k", "stagesPerDomain": 2}},
     "deployment.stagesPerDomain (2) must divide worker.stages (3)"),
    ({"deployment": {"mode": "leaderworkerset", "stagesPerDomain": 1}}, "deployment.stagesPerDomain needs deployment.topologyKey"),
    ({"deployment": {"mode": "leaderworkerset", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 0}}},
     "maxUnavailable and maxSurge cannot both be 0"),
    ({"deployment": {"mode": "leaderworkerset", "rollingUpdate": {"maxUnavailable": "0%", "maxSurge": 0}}},
     "maxUnavailable and maxSurge cannot both be 0"),
    ({"deployment": {"mode": "leaderworkerset", "rollingUpdate": {"maxSurge": "200%"}}}, "at '/deployment/rollingUpdate/maxSurge'"),
    ({"deployment": {"mode": "leaderworkerset", "replicas": -1}}, "at '/deployment/replicas': minimum"),
    ({"deployment": {"mode": "leaderworkerset", "topologyKey": "bad key"}}, "at '/deployment/topologyKey'"),
    ({"deployment": {"mode": "leaderworkerset", "topologyScope": "node"}}, "at '/deployment/topologyScope'"),
    ({**LWS_MODE, "fullnameOverride": "1st-mlaserve"}, "must start with a letter (DNS-1035)"),
    ({"stageAuth": {"mode": "tls"}}, "stageAuth.mode=tls closes the stages with mutual TLS: enable tls.internal"),
    ({"stageAuth": {"mode": "secret"}}, "at '/stageAuth/mode'"),
    ({"stageAuth": {"existingSecret": "Bad_Name"}}, "at '/stageAuth/existingSecret'"),
]


@pytest.mark.parametrize("values,message", REJECTED, ids=[m for _, m in REJECTED])
def test_nonsense_values_are_rejected(helm, values, message, tmp_path):
    p = helm_run(helm, ["template", RELEASE, str(CHART)], values, tmp_path, check=False)
    assert p.returncode != 0, f"accepted {values}"
    assert message in p.stderr, p.stderr


# ---------------------------------------------------------------------------------------------------
# Structure of the groups


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("case", CASES)
def test_groups(helm, case, tmp_path):
    v = values_of(case)
    docs = render(helm, CASES[case], tmp_path)
    lws = one(docs, "LeaderWorkerSet", LWS)
    spec, d = lws["spec"], v["deployment"]
    lwt = spec["leaderWorkerTemplate"]
    stages = v["worker"]["stages"]
    assert spec["replicas"] == d["replicas"] and lwt["size"] == stages + 1
    # The router's readiness follows its stages: LeaderReady would never create them.
    assert spec["startupPolicy"] == "LeaderCreated"
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert spec["networkConfig"] == {"subdomainPolicy": "Shared"}
    assert spec["rolloutStrategy"] == {"type": "RollingUpdate", "rollingUpdateConfiguration": d["rollingUpdate"]}
    annotations = lws["metadata"].get("annotations", {})
    if not d["topologyKey"]:
        assert not annotations and "subGroupPolicy" not in lwt
    elif d["topologyScope"] == "group":
        assert annotations == {"leaderworkerset.sigs.k8s.io/exclusive-topology": d["topologyKey"]}
        assert "subGroupPolicy" not in lwt
    else:
        assert annotations == {"leaderworkerset.sigs.k8s.io/subgroup-exclusive-topology": d["topologyKey"]}
        assert lwt["subGroupPolicy"] == {"subGroupPolicyType": "LeaderExcluded", "subGroupSize": d["stagesPerDomain"] or stages}

    leader, worker = lwt["leaderTemplate"], lwt["workerTemplate"]
    router_c, worker_c = leader["spec"]["containers"][0], worker["spec"]["containers"][0]
    # Leader = router without GPU; workers = stages with expertShards GPUs, one stage per node (any group).
    assert "nvidia.com/gpu" not in router_c["resources"].get("limits", {})
    gpus = worker_c["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert gpus == (v["worker"]["expertShards"] if v["worker"]["device"] == "cuda" else None)
    anti = worker["spec"].get("affinity", {}).get("podAntiAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", [])
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and GROUP not in t["labelSelector"]["matchLabels"]
               and matches(t["labelSelector"]["matchLabels"], worker["metadata"]["labels"]) for t in anti) == v["worker"]["onePodPerNode"]

    # One public Service over the routers of all groups, never the workers; metrics stay off it.
    pods = list(lws_pods(docs))
    public = one(docs, "Service", ROUTER)
    chosen = sorted(p for p, _, _, _, tpl in pods if matches(public["spec"]["selector"], tpl["metadata"]["labels"]))
    assert chosen == sorted(f"{LWS}-{g}" for g in range(d["replicas"]))
    http = v["router"]["http"]
    assert [p["name"] for p in public["spec"]["ports"]] == ["grpc", "http"][:1 + http["enabled"]]
    for p in public["spec"]["ports"]:
        assert port_of(router_c, p["targetPort"]) == (http["port"] if p["name"] == "http" else v["router"]["port"])
    # Every group's router serves the OpenAI HTTP API on router.http.port when enabled.
    assert flag(router_c["args"], "--http-listen") == http_listen(v)
    assert ("http" in [p["name"] for p in router_c["ports"]]) == http["enabled"]
    # The chart leaves the pods' headless Service to the LWS controller (named after the LWS).
    assert all(s["metadata"]["name"] != LWS for s in by_kind(docs, "Service"))
    worker_svc = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == WORKER]
    assert len(worker_svc) == int(v["metrics"]["enabled"])
    for s in worker_svc:
        assert [p["name"] for p in s["spec"]["ports"]] == ["metrics"]
        assert matches(s["spec"]["selector"], worker["metadata"]["labels"]) and not matches(s["spec"]["selector"], leader["metadata"]["labels"])

    # Probes as in statefulset mode; a stage's startup budget covers loading hundreds of GB.
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = worker_c[name]
        if v["tls"]["internal"]["enabled"]:
            assert f"-service={STAGE_SERVICE}" in probe["exec"]["command"]
        else:
            assert probe["grpc"] == {"port": port_of(worker_c, "grpc"), "service": STAGE_SERVICE}
    sp = worker_c["startupProbe"]
    assert sp["periodSeconds"] * sp["failureThreshold"] >= (60 if v["model"]["source"] == "demo" else 1800)
    assert router_c["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    # The router (hence the group) is Ready when its whole pipeline is: gRPC health "".
    rp, rport = router_c["readinessProbe"], port_of(router_c, "grpc")
    if v["tls"]["public"]["enabled"]:
        assert f"-addr=127.0.0.1:{rport}" in rp["exec"]["command"] and not any(a.startswith("-service") for a in rp["exec"]["command"])
    else:
        assert rp["grpc"] == {"port": rport}

    # PDBs select their component in every group.
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert matches(sel, worker["metadata"]["labels"]) != matches(sel, leader["metadata"]["labels"])


def admitted(policies, src: dict, dst: dict, port: str) -> bool:
    """NetworkPolicy semantics for pods of one namespace: isolated when selected, then the union of rules."""
    selecting = [p for p in policies if matches(p["spec"]["podSelector"].get("matchLabels", {}), dst)]
    if not selecting:
        return True
    for pol in selecting:
        for rule in pol["spec"].get("ingress", []):
            port_ok = not rule.get("ports") or any(p["port"] == port for p in rule["ports"])
            peers = rule.get("from") or [{"podSelector": {}}]
            from_ok = any(set(p) == {"podSelector"} and matches(p["podSelector"].get("matchLabels", {}), src) for p in peers)
            if port_ok and from_ok:
                return True
    return False


@pytest.mark.parametrize("case", ["lws-3-groups", "lws-2-groups-4-stages-2-per-domain-no-metrics-no-http", "deploy/values-deepseek-v3-fp8-1x8xh200"])
def test_network_policy_admits_only_the_groups_own_router_and_stages(helm, case, tmp_path):
    v = values_of(case)
    docs = render(helm, CASES[case], tmp_path)
    policies = by_kind(docs, "NetworkPolicy")
    pods = {pod: (role, g, tpl["metadata"]["labels"]) for pod, role, g, _, tpl in lws_pods(docs)}
    base = {"app.kubernetes.io/name": "mlaserve", "app.kubernetes.io/instance": RELEASE}
    n = v["deployment"]["replicas"]
    strangers = {
        "other-release-router": {**base, "app.kubernetes.io/instance": "other", "app.kubernetes.io/component": "router", GROUP: "0"},
        "unlabelled": {},
        "helm-test": {**base, "app.kubernetes.io/component": "test"},
    }
    # A group the chart did not render (e.g. `kubectl scale lws` past deployment.replicas).
    extra = {f"{LWS}-{n}": ("router", n, {**base, "app.kubernetes.io/component": "router", GROUP: str(n)}),
             f"{LWS}-{n}-1": ("worker", n, {**base, "app.kubernetes.io/component": "worker", GROUP: str(n)})}
    sources = {**{p: labels for p, (_, _, labels) in {**pods, **extra}.items()}, **strangers}
    for dst, (role, g, dlabels) in {**pods, **extra}.items():
        for src, slabels in sources.items():
            ok = admitted(policies, slabels, dlabels, "grpc")
            if role == "worker":
                want = src in pods and pods[src][1] == g
                assert ok == want, f"{src} -> {dst} stage port: {ok}"
            else:
                assert ok == (not v["networkPolicy"]["routerFrom"]), f"{src} -> router {dst}"
                # The OpenAI HTTP port exactly like gRPC when on, closed when off.
                ok_http = admitted(policies, slabels, dlabels, "http")
                assert ok_http == (ok and v["router"]["http"]["enabled"]), f"{src} -> router {dst} http"
            if v["metrics"]["enabled"]:
                assert admitted(policies, slabels, dlabels, "metrics")


@pytest.mark.parametrize("case", ["lws-3-groups", "lws-2-groups-3-stages-explicit-rack-mtls",
                                  "lws-2-groups-4-stages-2-per-domain-no-metrics-no-http", "lws-group-scope-cpu-no-auth"])
@pytest.mark.parametrize("mode", ["leaderworkerset", "statefulset"])
def test_closed_stages(helm, case, mode, tmp_path):
    """Token (generated or given), mutual TLS or nothing: what each pod mounts and its TOML says."""
    values = merged(CASES[case], {"deployment": {"mode": mode}})
    if mode == "statefulset":
        values["deployment"] = {"mode": mode}
    v = merged(DEFAULTS, values)
    docs = render(helm, values, tmp_path)
    a = v["stageAuth"]
    cm = one(docs, "ConfigMap")["data"]
    secrets = by_kind(docs, "Secret")
    if a["mode"] == "token" and not a["existingSecret"]:
        (s,) = secrets
        assert s["metadata"]["name"] == f"{FULL}-stage-token" and len(s["data"][a["secretKey"]]) >= 64
    else:
        assert not secrets
    templates = [tpl for d in docs if d["kind"] in ("Deployment", "StatefulSet") for tpl in [d["spec"]["template"]]] + \
        [t for d in by_kind(docs, "LeaderWorkerSet") for t in d["spec"]["leaderWorkerTemplate"].values() if isinstance(t, dict) and "spec" in t]
    assert len(templates) == 2
    for tpl in templates:
        vols = {x["name"]: x for x in tpl["spec"]["volumes"]}
        mounts = {m["name"]: m for m in tpl["spec"]["containers"][0]["volumeMounts"]}
        if a["mode"] == "token":
            secret = vols["stage-token"]["secret"]
            assert secret["secretName"] == (a["existingSecret"] or f"{FULL}-stage-token")
            assert secret["items"] == [{"key": a["secretKey"], "path": "token"}]
            assert mounts["stage-token"]["mountPath"] == "/etc/mlaserve/stage-token" and mounts["stage-token"]["readOnly"]
        else:
            assert "stage-token" not in vols and "stage-token" not in mounts
    for role in ("router", "worker"):
        import tomllib

        sec = tomllib.loads(cm[f"{role}.toml"]).get("security", {})
        assert ("stage_token_file" in sec) == (a["mode"] == "token")
        if a["mode"] == "token":
            assert sec["stage_token_file"] == "/etc/mlaserve/stage-token/token"
        if a["mode"] == "tls":
            assert (role == "worker") == bool(sec.get("tls_client_ca")), "workers require client certificates"


# ---------------------------------------------------------------------------------------------------
# The rendered commands against the real binary


CHECKED = ["lws-3-groups", "lws-2-groups-3-stages-explicit-rack-mtls", "lws-group-scope-cpu-no-auth",
           *[c for c in CASES if c.startswith(("ci/", "deploy/"))]]


@pytest.mark.parametrize("case", CHECKED)
def test_group_router_resolves_its_own_stages_in_layer_order(helm, case, tmp_path):
    v = values_of(case)
    need_stage_token(v)
    docs = render(helm, CASES[case], tmp_path)
    pods = list(lws_pods(docs))
    groups = {}
    for pod, role, g, i, tpl in pods:
        if role == "worker":
            groups.setdefault(g, {})[i] = pod_dns(tpl, v)
    seen = set()
    for pod, role, g, _, tpl in pods:
        if role != "router":
            continue
        sb = LwsSandbox(tmp_path / pod, pod, tpl, docs)
        for init in tpl["spec"].get("initContainers", []):
            assert sb.run(init, check=False).returncode == 0
        s = checked_settings(sb.run(tpl["spec"]["containers"][0], check=True), "router")
        # Exactly its own group's stage pods, stage k = worker index k+1, by their stable DNS names.
        own = [f"{groups[g][k + 1]}:{v['worker']['port']}" for k in range(v["worker"]["stages"])]
        assert s["router"]["stages"] == own
        assert s["router"]["http_listen"] == (http_listen(v) or "")
        assert all(a.startswith(f"{LWS}-{g}-") for a in own)
        assert not seen & set(own), "two groups share a stage"
        seen |= set(own)
        assert_files_exist(s["security"], sb)
        assert bool(s["security"].get("stage_token_file")) == (v["stageAuth"]["mode"] == "token")
        assert bool(s["security"]["stage_client_cert"]) == v["tls"]["internal"]["enabled"]
    assert len(seen) == v["deployment"]["replicas"] * v["worker"]["stages"]


@pytest.mark.parametrize("case", CHECKED)
def test_group_workers_run_their_layers(helm, case, tmp_path):
    v = values_of(case)
    need_stage_token(v)
    docs = render(helm, CASES[case], tmp_path)
    ranges = expected_ranges(v)
    worker_bin = CUDA_BIN if "mlaserve-worker" in v["image"]["worker"]["repository"] else BIN
    if not worker_bin.exists():
        pytest.skip(f"{worker_bin} is missing (make build-cuda): the worker image's binary")
    per_group = {}
    for pod, role, g, i, tpl in lws_pods(docs):
        if role != "worker" or g > 1:  # two groups are enough: every group renders the same
            continue
        sb = LwsSandbox(tmp_path / pod, pod, tpl, docs)
        for init in tpl["spec"].get("initContainers", []):
            assert sb.run(init, check=False).returncode == 0
        c = tpl["spec"]["containers"][0]
        s = checked_settings(sb.run(c, check=True), "worker")
        assert s["worker"]["layers"] == ranges[i - 1]
        assert s["worker"]["expert_shards"] == v["worker"]["expertShards"]
        assert s["worker"]["listen"].rsplit(":", 1)[1] == str(port_of(c, "grpc"))
        assert bool(s["security"].get("stage_token_file")) == (v["stageAuth"]["mode"] == "token")
        assert bool(s["security"]["tls_client_ca"]) == v["tls"]["internal"]["enabled"]
        assert_files_exist(s["security"], sb)
        assert f"mlaserve.group={g}" in sb.env(c)["OTEL_RESOURCE_ATTRIBUTES"]
        per_group.setdefault(g, []).append(s["worker"]["layers"])
    assert all(layers == ranges for layers in per_group.values()), per_group


def test_worker_wrapper_refuses_an_index_beyond_the_stages(helm, tmp_path):
    values = CASES["lws-group-scope-cpu-no-auth"]
    docs = render(helm, values, tmp_path)
    _, _, _, _, tpl = next(p for p in lws_pods(docs) if p[1] == "worker")
    tpl["metadata"]["labels"][INDEX] = "3"  # a group resized behind the chart's back
    sb = LwsSandbox(tmp_path / "w", f"{LWS}-0-3", tpl, docs)
    p = sb.run(tpl["spec"]["containers"][0], check=True)
    assert p.returncode == 1 and f"pod {LWS}-0-3 (index 3 in group 0) has no stage: groups of this release have 2 stages" in p.stderr


def test_demo_values_serve_two_groups(helm, tmp_path):
    """ci/demo-cpu-lws-values.yaml as processes on loopback: every pod of both groups runs its rendered
    command (init containers build the demo model; workers pick their layers from the worker-index
    label; the stage token from the generated Secret's mount), each router reaches exactly its own
    group's stages through the names the kubelet expands, and both stream the same completion.
    Pod DNS is stood in for by mapping each stage name to that worker's loopback address."""
    import harness

    values = CASES["ci/demo-cpu-lws-values"]
    v = merged(DEFAULTS, values)
    need_stage_token(v)
    docs = render(helm, values, tmp_path)
    pods = list(lws_pods(docs))
    loopback = {"LISTEN": "127.0.0.1:0", "METRICS_LISTEN": "127.0.0.1:0"}
    procs, stage_addr, routers = [], {}, {}
    try:
        for role in ("worker", "router"):
            for pod, r, g, _, tpl in pods:
                if r != role:
                    continue
                sb = LwsSandbox(tmp_path / pod, pod, tpl, docs)
                for init in tpl["spec"].get("initContainers", []):
                    assert sb.run(init, check=False).returncode == 0
                c = copy.deepcopy(tpl["spec"]["containers"][0])
                env = {f"MLASERVE_{role.upper()}__{k}": a for k, a in loopback.items()}
                if role == "router":
                    names = [expand(a, sb.env(c)) for a in c["args"]]
                    stages = [names[i + 1] for i, a in enumerate(names) if a == "--stage"]
                    assert stages == [f"{LWS}-{g}-{k + 1}.{LWS}.{NS}.svc:{v['worker']['port']}" for k in range(v["worker"]["stages"])]
                    c["args"] = loopback_http([stage_addr.get(a, a) for a in names])  # two routers, one host
                p, addr, _ = start(sb, c, env, role, tmp_path / f"{pod}.log")
                procs.append(p)
                if role == "worker":
                    wait_serving(addr, c["readinessProbe"]["grpc"]["service"], p)
                    stage_addr[f"{pod_dns(tpl, v)}:{port_of(c, 'grpc')}"] = addr
                else:
                    wait_serving(addr, "", p)
                    routers[g] = addr
                    assert http_get(f"http://{p.http}/health") == (200, {"status": "ok"})
        assert sorted(routers) == list(range(v["deployment"]["replicas"]))
        outs = []
        for g, addr in sorted(routers.items()):
            info = harness.model_info(addr)
            assert info.healthy and [(s.layer_start, s.layer_end) for s in info.stages] == \
                [tuple(map(int, r.split(".."))) for r in expected_ranges(v)]
            s, ch = harness.stub(addr)
            with ch:
                outs.append(harness.generate(s, input_ids=harness.pb.TokenIds(ids=[3, 4, 5]), **harness.greedy(8)).ids)
        assert len(outs[0]) == 8 and all(o == outs[0] for o in outs)
    finally:
        for p in reversed(procs):
            stop(p)


def test_notes_describe_the_groups(helm, tmp_path):
    out = helm_run(helm, ["install", RELEASE, str(CHART), "--namespace", NS, "--dry-run=client"], CASES["lws-3-groups"], tmp_path).stdout
    notes = out[out.index("NOTES:"):]
    assert f"3 group(s) of LeaderWorkerSet {LWS}" in notes
    assert f"wait lws/{LWS} --for=condition=Available" in notes
    assert f"{LWS}-<g>-1.{LWS}.{NS}.svc:50061" in notes and f"{LWS}-<g>-2.{LWS}.{NS}.svc:50061" in notes
    assert "$(GROUP_INDEX)" not in notes
    assert f"port-forward svc/{ROUTER} 50051:50051 8000:8000" in notes and "localhost:8000/v1/chat/completions" in notes
