"""The cpu overlay's pod, unchanged, on the real llama-server: its init container pulls the config's model
from a hub (a local stand-in holding the real Gemma 3 270M bytes under the config's repo name) and
verifies it, then the Deployment's command serves it, and the readiness probe passes once it is loaded."""

from __future__ import annotations

from pathlib import Path

import requests
import yaml

from tests.e2e.conftest import llama_server_binary
from tests.support.deploy import KEY, manifest_config, new_pod, pod_spec, probe_url, render, run_init_container, status
from tests.support.fake_hub import FakeHub
from tests.support.harness import wait_until


def test_the_cpu_overlays_pod_pulls_and_serves_its_model(berth, gemma_gguf, tmp_path):
    llama_server_binary()  # the config's bare `llama-server` must be the real one
    objects = render("overlays/cpu")
    container = pod_spec(objects)["containers"][0]
    config = manifest_config(objects)
    (model_id, spec), = config["models"].items()
    repo, quant = spec["model"].split(":")
    hub = FakeHub().start()
    try:
        file_name = f"{repo.split('/')[1].removesuffix('-GGUF')}-{quant}.gguf"
        hub.add(repo, file_name, Path(gemma_gguf))
        pod = new_pod(tmp_path, container)
        pod.mount_config({"config.yaml": yaml.safe_dump(config)})
        pulled = run_init_container(objects, pod, hub.url)
        assert pulled.returncode == 0, pulled.stderr
        assert hub.gets[file_name] == 1
    finally:
        hub.stop()
    # the hub is gone: serving reads only the verified store
    b = berth(None, argv=pod.argv(container), port=pod.ports[8080], env=pod.env(container))
    wait_until(lambda: status(probe_url(pod, container, "readinessProbe")) == 200, 120, "the preload")
    auth = {"Authorization": f"Bearer {KEY}"}
    answer = requests.post(b.url + "/v1/completions", headers=auth, timeout=120,
                           json={"model": model_id, "prompt": "The capital of France is", "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == model_id and answer.json()["usage"]["completion_tokens"] > 0
    running = requests.get(b.url + "/running", headers=auth, timeout=10).json()["running"]
    (entry,) = running
    assert entry["model"] == model_id and str(pod.data_dir / "models") in entry["cmd"]
    assert "--host 127.0.0.1" in entry["cmd"]  # the image's LLAMA_ARG_HOST=0.0.0.0 cannot expose it
