"""deploy/ as tests see it: the rendered Kubernetes objects, and a pod's filesystem and command laid out
in a temporary directory, so the manifests' own command lines run here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

from tests.support.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
TOOLS = ROOT / ".tools" / "deploy" / "bin"  # where scripts/test.sh installs the linters
KEY = "k" * 40  # the test's value of the Secret berth-api-keys
SECRETS = {"berth-api-keys/api-key": KEY}


def deploy_tool(name: str) -> str:
    found = shutil.which(name, path=str(TOOLS)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; ./scripts/test.sh installs it into {TOOLS.parent}")
    return found


def render(kustomization: str) -> list[dict]:
    """The objects `kubectl kustomize deploy/kubernetes/<kustomization>` renders."""
    run = subprocess.run([deploy_tool("kubectl"), "kustomize", str(DEPLOY / "kubernetes" / kustomization)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


def by_kind(objects: list[dict], kind: str, name: str = "berth") -> dict:
    found = [o for o in objects if o["kind"] == kind and (kind in ("ConfigMap", "PersistentVolumeClaim")
                                                          or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def pod_spec(objects: list[dict], name: str = "berth") -> dict:
    return by_kind(objects, "Deployment", name)["spec"]["template"]["spec"]


def containerfile_env() -> dict[str, str]:
    """The image's ENV (one instruction, `K=V \\` continued lines), $PATH left to the host's."""
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in line[4:].split():
                key, _, value = pair.partition("=")
                env[key] = value
    env.pop("PATH", None)  # the image puts /opt/berth/bin and /app first; here berth is this Python's
    return env


def containerfile_command() -> list[str]:
    """ENTRYPOINT + CMD (both in JSON form)."""
    found = {}
    for line in CONTAINERFILE.read_text().splitlines():
        for instruction in ("ENTRYPOINT", "CMD"):
            if line.startswith(instruction + " "):
                found[instruction] = json.loads(line[len(instruction) + 1:])
    return found["ENTRYPOINT"] + found["CMD"]


@dataclass
class Pod:
    """The pod's paths and ports mapped to a temporary directory and free ports on 127.0.0.1.

    /config is laid out as the kubelet mounts a ConfigMap: files are symlinks through `..data`, which
    an update swaps atomically to a new timestamped directory."""

    root: Path
    ports: dict[int, int]  # container port -> port here
    secrets: dict[str, str] = field(default_factory=dict)  # "secret/key" -> value
    _generation: int = 0

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def mount_config(self, files: dict[str, str]) -> None:
        """Write a ConfigMap's files the kubelet's way (first mount or update)."""
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._generation += 1
        version = self.config_dir / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{self._generation}"
        version.mkdir()
        for name, text in files.items():
            (version / name).write_text(text)
        staging = self.config_dir / "..data_tmp"
        staging.symlink_to(version.name)
        os.replace(staging, self.config_dir / "..data")  # the atomic swap
        for name in files:
            link = self.config_dir / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")

    def translate(self, text: str) -> str:
        """A path or address as the pod sees it -> as it is here."""
        text = text.replace("/config/", f"{self.config_dir}/").replace("/data", str(self.data_dir))
        for inside, here in self.ports.items():
            text = text.replace(f"0.0.0.0:{inside}", f"127.0.0.1:{here}")
        return text

    def argv(self, container: dict) -> list[str]:
        """The container's command with its paths and ports here; `berth` is this Python's berth."""
        argv = [self.translate(a) for a in container.get("command", []) + container.get("args", [])]
        assert argv[0] == "berth", argv
        return [sys.executable, "-m", "berth.cli", *argv[1:]]

    def env(self, container: dict, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The host's environment, then the image's ENV, then the container's env (Kubernetes' order)."""
        env = {**os.environ, **{k: self.translate(v) for k, v in containerfile_env().items()}}
        for entry in container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = self.translate(entry["value"])
            else:
                ref = entry["valueFrom"]["secretKeyRef"]
                env[entry["name"]] = self.secrets[f"{ref['name']}/{ref['key']}"]
        return {**env, **(extra or {})}


def probe_url(pod: Pod, container: dict, probe: str) -> str:
    """Where the kubelet would send a container's probe, here."""
    get = container[probe]["httpGet"]
    port = get["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
    return f"http://127.0.0.1:{pod.ports[port]}{get['path']}"


def manifest_config(objects: list[dict]) -> dict:
    """The berth config the ConfigMap holds."""
    return yaml.safe_load(by_kind(objects, "ConfigMap")["data"]["config.yaml"])


def new_pod(tmp_path: Path, container: dict) -> Pod:
    return Pod(tmp_path / "pod", {p["containerPort"]: free_port() for p in container["ports"]}, SECRETS)


def status(url: str) -> int:
    return requests.get(url, timeout=10).status_code


def run_init_container(objects: list[dict], pod: Pod, hub_url: str) -> subprocess.CompletedProcess:
    init = pod_spec(objects)["initContainers"][0]
    return subprocess.run(pod.argv(init), capture_output=True, text=True, timeout=300,
                          env=pod.env(init, {"HF_ENDPOINT": hub_url}))
