"""The commands deploy/ runs, run here as a pod would run them: the Deployment's command, environment
and config (its model swapped for a fake server), the kubelet's probes at the manifests' paths and
ports, a ConfigMap update, SIGTERM with a request in flight; the init container's pull against a fake
hub; the Containerfile's own command and HEALTHCHECK."""

from __future__ import annotations

import re
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from tests.support.deploy import (CONTAINERFILE, KEY, Pod, containerfile_command, manifest_config, new_pod,
                                  pod_spec, probe_url, render, run_init_container, status)
from tests.support.fake_hub import FakeHub
from tests.support.ggufs import write_gguf
from tests.support.harness import fake_cmd, wait_until

@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render("overlays/cpu")


def with_fake_models(config: dict, *flags: str) -> str:
    """The manifest's config, every setting kept, each model served by the fake server."""
    config = {**config, "models": {m: {**spec, "cmd": fake_cmd(m, *flags)} for m, spec in config["models"].items()}}
    for spec in config["models"].values():
        spec.pop("model", None)  # nothing to pull for a fake
    return yaml.safe_dump(config)


def test_the_deployments_command_serves_probes_answer_and_sigterm_drains(berth, objects, tmp_path):
    container = pod_spec(objects)["containers"][0]
    pod = new_pod(tmp_path, container)
    config = manifest_config(objects)
    pod.mount_config({"config.yaml": with_fake_models(config, "--load-delay", "5")})
    b = berth(None, argv=pod.argv(container), port=pod.ports[8080], env=pod.env(container))
    ready, health = probe_url(pod, container, "readinessProbe"), probe_url(pod, container, "livenessProbe")
    assert status(probe_url(pod, container, "startupProbe")) == 200  # berth listens; the preload runs
    assert status(ready) == 503 and status(health) == 200  # not routed to while its preload loads
    wait_until(lambda: status(ready) == 200, 30, "readiness after the preload")
    (model,) = config["hooks"]["on_startup"]["preload"]
    api = b.url + "/v1/chat/completions"
    assert requests.post(api, json={"model": model, "messages": []}, timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}  # the Secret's value, through ${env.BERTH_API_KEY}
    assert requests.post(api, json={"model": model, "messages": []}, headers=auth, timeout=30).status_code == 200
    metrics = f"http://127.0.0.1:{pod.ports[9090]}/metrics"  # the scrape annotations' port, keyless
    assert f'berth_model_state{{model="{model}",state="ready"}} 1.0' in requests.get(metrics, timeout=10).text
    # SIGTERM (what the kubelet sends) with a stream in flight: not ready, still live, the stream ends
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(requests.post, api, headers=auth, timeout=60, json={
            "model": model, "messages": [], "stream": True, "chunks": 30, "chunk_delay": 0.1})
        wait_until(lambda: "berth_requests_running 1.0" in requests.get(metrics, timeout=10).text, 10,
                   "the stream to start")
        b.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: status(ready) == 503, 10, "readiness to fail while draining")
        assert status(health) == 200  # liveness holds: the kubelet must not kill a draining pod
        assert stream.result().text.rstrip().endswith("data: [DONE]")
    grace = pod_spec(objects)["terminationGracePeriodSeconds"]
    assert b.proc.wait(grace) == 0


def test_a_configmap_update_reloads_berth_without_a_restart(berth, objects, tmp_path):
    container = pod_spec(objects)["containers"][0]
    pod = new_pod(tmp_path, container)
    config = manifest_config(objects)
    pod.mount_config({"config.yaml": with_fake_models(config)})
    b = berth(None, argv=pod.argv(container), port=pod.ports[8080], env=pod.env(container))
    auth = {"Authorization": f"Bearer {KEY}"}
    model = next(iter(config["models"]))
    config["models"][model]["aliases"] = ["chat"]
    pod.mount_config({"config.yaml": with_fake_models(config)})  # what `kubectl apply -k` leads to

    def ids() -> set[str]:
        listed = requests.get(b.url + "/v1/models", headers=auth, timeout=10).json()["data"]
        return {m["id"] for m in listed} | {a for m in listed for a in m.get("aliases", [])}

    wait_until(lambda: "chat" in ids() or requests.post(
        b.url + "/v1/chat/completions", headers=auth, timeout=30,
        json={"model": "chat", "messages": []}).status_code == 200, 20, "the updated ConfigMap to be in force")
    assert b.proc.poll() is None  # the same process: no restart, models kept


def test_the_containerfiles_command_and_healthcheck(berth, objects, tmp_path):
    container = pod_spec(objects)["containers"][0]
    pod = new_pod(tmp_path, container)
    pod.mount_config({"config.yaml": with_fake_models(manifest_config(objects))})
    argv = [pod.translate(a) for a in containerfile_command()]
    assert argv[0] == "berth"
    b = berth(None, argv=[sys.executable, "-m", "berth.cli", *argv[1:]], port=pod.ports[8080],
              env=pod.env({"env": [{"name": "BERTH_API_KEY", "value": KEY}]}))
    healthcheck = re.search(r'HEALTHCHECK.*?"(http://[^"]+)"', CONTAINERFILE.read_text(), re.S).group(1)
    assert status(healthcheck.replace("127.0.0.1:8080", f"127.0.0.1:{pod.ports[8080]}")) == 200
    assert status(f"http://127.0.0.1:{pod.ports[9090]}/metrics") == 200
    assert b.proc.poll() is None


def publish_model_of(config: dict, hub: FakeHub, tmp_path: Path, elements: int = 4096) -> tuple[str, Path]:
    """A small GGUF on the fake hub, under the repo and quant the manifest's model names."""
    (ref,) = [spec["model"] for spec in config["models"].values()]
    repo, quant = ref.split(":")
    name = f"{repo.split('/')[1].removesuffix('-GGUF')}-{quant}.gguf"
    path = write_gguf(tmp_path / "upstream" / name, elements=elements)
    hub.add(repo, name, path)
    return name, path


@pytest.fixture
def hub():
    server = FakeHub().start()
    yield server
    server.stop()


def test_the_init_container_pulls_and_verifies_and_a_bad_hash_fails_the_pod(objects, hub, tmp_path):
    container = pod_spec(objects)["containers"][0]
    pod = new_pod(tmp_path, container)
    config = manifest_config(objects)
    pod.mount_config({"config.yaml": yaml.safe_dump(config)})
    name, _ = publish_model_of(config, hub, tmp_path)
    pulled = run_init_container(objects, pod, hub.url)
    assert pulled.returncode == 0, pulled.stderr
    markers = list((pod.data_dir / "models").glob("*/berth-model.json"))
    assert len(markers) == 1 and name in markers[0].read_text()
    again = run_init_container(objects, pod, hub.url)  # the next pod start finds it verified: no download
    assert again.returncode == 0 and hub.gets[name] == 1
    # a fresh volume, and a hub whose bytes no longer match the hash it announces
    broken = new_pod(tmp_path / "second", container)
    broken.mount_config({"config.yaml": yaml.safe_dump(config)})
    _, path = publish_model_of(config, hub, tmp_path / "second")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    failed = run_init_container(objects, broken, hub.url)
    assert failed.returncode != 0  # the pod does not start
    assert "sha256 mismatch" in failed.stderr and name in failed.stderr, failed.stderr  # the reason, in its log
    assert not list((broken.data_dir / "models").glob("*/berth-model.json"))
