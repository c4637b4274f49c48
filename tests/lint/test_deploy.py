"""deploy/: the Containerfile lints, each Kubernetes overlay renders with kustomize, validates offline
against Kubernetes' schemas, passes checkov, and its parts agree with each other and with berth."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.deploy import CONTAINERFILE, DEPLOY, by_kind, deploy_tool, pod_spec, render

RENDERINGS = {"cpu": "overlays/cpu", "cuda": "overlays/cuda", "scale-out": "scale-out"}
CUSTOM_KINDS = ("ServiceMonitor", "InferencePool", "HTTPRoute")  # no schemas offline: checked below


def berth_container(objects: list[dict]) -> dict:
    return pod_spec(objects)["containers"][0]


@pytest.fixture(scope="module", params=list(RENDERINGS))
def rendered(request, tmp_path_factory) -> tuple[str, list[dict], Path]:
    objects = render(RENDERINGS[request.param])
    path = tmp_path_factory.mktemp(request.param) / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    return request.param, objects, path


def test_every_object_validates_against_kubernetes_schemas(rendered):
    _, objects, path = rendered
    run = subprocess.run([deploy_tool("kubernetes-validate"), "--strict", str(path)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    # Every built-in kind was checked; custom resources have no schema offline and are checked below.
    passed = re.findall(r"passed for resource (\w+)/", run.stdout)
    builtin = [o["kind"].lower() for o in objects if o["kind"] not in CUSTOM_KINDS]
    assert sorted(passed) == sorted(builtin), run.stdout


def test_checkov_finds_nothing_and_every_skip_is_explained(rendered):
    _, objects, path = rendered
    run = subprocess.run([deploy_tool("checkov"), "-f", str(path), "--framework", "kubernetes", "--compact",
                          "--quiet", "--skip-download"], capture_output=True, text=True, timeout=600,
                         cwd=path.parent, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    assert run.returncode == 0, run.stdout[-6000:]
    assert "Failed checks: 0" in run.stdout and re.search(r"Passed checks: [1-9]", run.stdout), run.stdout
    for obj in objects:
        for key, value in (obj["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, why = value.partition("=")
                assert re.fullmatch(r"CKV2?_K8S_\d+", check) and len(why) > 20, value


def test_containerfile_lints_clean(tmp_path):
    containerfile = DEPLOY / "container" / "Containerfile"
    run = subprocess.run([deploy_tool("hadolint"), str(containerfile)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    dockerfile = tmp_path / "Dockerfile"  # the name checkov's dockerfile checks look for
    shutil.copy(containerfile, dockerfile)
    run = subprocess.run([deploy_tool("checkov"), "-f", str(dockerfile), "--framework", "dockerfile", "--compact",
                          "--quiet", "--skip-download"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and "Failed checks: 0" in run.stdout, run.stdout[-4000:]


def test_the_parts_agree(rendered):
    """What no schema checks: names and ports that must match across objects, and berth's own settings."""
    name, objects, _ = rendered
    overlay = "cuda" if name == "scale-out" else name  # several berths of the cuda overlay
    deployment = by_kind(objects, "Deployment")
    pod = pod_spec(objects)
    container = berth_container(objects)
    assert deployment["spec"]["replicas"] == (3 if name == "scale-out" else 1)
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    argv = container["command"] + container["args"]
    assert argv[:2] == ["berth", "serve"] and "--watch-config" in argv
    assert argv[argv.index("--listen") + 1] == f"0.0.0.0:{ports['http']}"
    assert argv[argv.index("--metrics-listen") + 1] == f"0.0.0.0:{ports['metrics']}"
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    # the Service, the ServiceMonitor and the NetworkPolicy name the same ports and pods
    service = by_kind(objects, "Service")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "http", "metrics": "metrics"}
    monitor = by_kind(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("NetworkPolicy", "PodDisruptionBudget"):
        selector = by_kind(objects, kind)["spec"]["podSelector" if kind == "NetworkPolicy" else "selector"]
        assert selector["matchLabels"].items() <= labels.items(), kind
    allowed = {p["port"] for rule in by_kind(objects, "NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == set(ports.values())
    # volumes: the config from the ConfigMap, the store on the claim, the read-only root's /tmp
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == by_kind(objects, "ConfigMap")["metadata"]["name"]
    if name == "scale-out":  # a volume per pod: one ReadWriteOnce claim cannot serve three
        assert "ephemeral" in volumes["data"] and not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    else:
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == \
            by_kind(objects, "PersistentVolumeClaim")["metadata"]["name"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    env = {e["name"]: e for e in container["env"]}
    assert mounts["/data"] == "data" and env["BERTH_HOME"]["value"] == "/data" and "/tmp" in mounts
    # the init container pulls with the same config, store and environment
    init = pod["initContainers"][0]
    assert init["command"] == ["berth", "pull", "--all", "-c", "/config/config.yaml"]
    assert init["env"] == container["env"] and init["volumeMounts"] == container["volumeMounts"]
    assert init["image"] == container["image"] and container["image"].endswith(f":{overlay}")
    # the grace period outlasts berth's drain (shutdownTimeout) with room to stop models and save slots
    config = yaml.safe_load(by_kind(objects, "ConfigMap")["data"]["config.yaml"])
    assert pod["terminationGracePeriodSeconds"] >= config["shutdownTimeout"] + 30
    # the key comes from a Secret, through the ${env.X} the config names
    assert config["apiKeys"] == ["${env.BERTH_API_KEY}"]
    assert env["BERTH_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "berth-api-keys"
    if overlay == "cuda":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert "nvidia.com/gpu" not in container["resources"]["limits"] and "nodeSelector" not in pod


def test_each_overlays_config_passes_berth_check(rendered, tmp_path):
    _, objects, _ = rendered
    config = tmp_path / "config.yaml"
    config.write_text(by_kind(objects, "ConfigMap")["data"]["config.yaml"])
    env = {**os.environ, "BERTH_API_KEY": "k" * 32, "BERTH_HOME": str(tmp_path / "home")}
    run = subprocess.run([sys.executable, "-m", "berth.cli", "check", "-c", str(config)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "warning" not in run.stderr.lower(), run.stderr
    models = yaml.safe_load(config.read_text())["models"]
    for model_id in models:
        assert re.search(rf"^{re.escape(model_id)}$", run.stdout, re.M), run.stdout


def test_the_scale_out_pool_and_picker_point_at_the_berths():
    objects = render(RENDERINGS["scale-out"])
    berth_pod = by_kind(objects, "Deployment")["spec"]["template"]
    container = berth_pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    pool = by_kind(objects, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"].items() <= berth_pod["metadata"]["labels"].items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [ports["http"]]
    picker_service = by_kind(objects, "Service", "berth-endpoint-picker")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == picker_service["metadata"]["name"]
    assert ref["port"]["number"] in [p["port"] for p in picker_service["spec"]["ports"]]
    picker = pod_spec(objects, "berth-endpoint-picker")["containers"][0]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in picker["args"])
    assert (flags["pool-name"], flags["pool-namespace"]) == (pool["metadata"]["name"], pool["metadata"]["namespace"])
    assert int(flags["model-server-metrics-port"]) == ports["metrics"]
    # the berths let the picker (and only it, besides monitoring) reach the metrics port
    picker_labels = by_kind(objects, "Deployment", "berth-endpoint-picker")["spec"]["template"]["metadata"]["labels"]
    sources = [rule["from"] for rule in by_kind(objects, "NetworkPolicy")["spec"]["ingress"]
               if any(p["port"] == ports["metrics"] for p in rule["ports"])]
    assert any(s.get("podSelector", {}).get("matchLabels", {}).items() <= picker_labels.items()
               for rule in sources for s in rule if "podSelector" in s)
    route = by_kind(objects, "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0] == {
        "group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool["metadata"]["name"]}


PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")  # pods, services, metadata


def test_the_network_policy_takes_labelled_clients_and_lets_out_only_dns_and_https_outside_the_cluster(rendered):
    import ipaddress

    _, objects, _ = rendered
    spec = by_kind(objects, "NetworkPolicy")["spec"]
    api = [rule for rule in spec["ingress"] if any(p["port"] == 8080 for p in rule["ports"])]
    assert api and all(rule.get("from") for rule in api)  # a rule without `from` admits everyone
    for peer in (peer for rule in api for peer in rule["from"]):
        assert set(peer) == {"namespaceSelector"} and peer["namespaceSelector"].get("matchLabels"), peer
    assert {"berth/api-client": "true"} in [p["namespaceSelector"]["matchLabels"] for r in api for p in r["from"]]
    assert spec["egress"] and all(rule.get("to") for rule in spec["egress"])  # no rule open to every address
    for rule in spec["egress"]:
        ports = {p["port"] for p in rule["ports"]}
        assert ports in ({53}, {443}), rule
        if ports == {53}:
            assert rule["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}]
            continue
        blocks = [peer["ipBlock"] for peer in rule["to"]]
        assert all(set(peer) == {"ipBlock"} for peer in rule["to"]), rule
        v4 = [b for b in blocks if ipaddress.ip_network(b["cidr"]).version == 4]
        for block in v4:
            excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
            for private in map(ipaddress.ip_network, PRIVATE_RANGES):
                assert any(private.subnet_of(e) for e in excepted), (private, block)
        for block in blocks:
            if ipaddress.ip_network(block["cidr"]).version == 6:
                assert ipaddress.ip_network("fc00::/7") in map(ipaddress.ip_network, block.get("except", []))


def test_the_image_is_built_from_a_pinned_base_and_hashed_packages():
    import tomllib

    text = CONTAINERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"ghcr\.io/ggml-org/llama\.cpp:server-b\d+@sha256:[0-9a-f]{64}", base.group(1))
    assert re.findall(r"^FROM .*$", text, re.M) == ["FROM ${BASE_IMAGE}"]
    installs = re.findall(r"pip install [^\\\n]*", text)
    assert installs == ["pip install --no-cache-dir --require-hashes -r /tmp/berth-src/requirements.lock ",
                        "pip install --no-cache-dir --no-deps --no-build-isolation /tmp/berth-src "], installs
    lock = (CONTAINERFILE.parent / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.split("\n", 2)[2])  # each pinned package with its hashes
    pinned = {}
    for entry in entries:
        name, version = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", entry).groups()
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), entry[:200]
        pinned[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    for requirement in wanted:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()
        assert name in pinned, f"{requirement} is not in requirements.lock: regenerate it (the command at its top)"
