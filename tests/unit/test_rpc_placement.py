"""Placing a model over rpc agents: the config section, the arguments written, the memory per agent."""

from __future__ import annotations

import textwrap

import pytest

from berth.config import parse_config
from berth.core.errors import ConfigError
from berth.core.gguf import read_gguf_header
from berth.core.units import device_key
from berth.engine.llama_args import LlamaServerArgs
from berth.engine.rpc import PlacementError, RpcTargets, apply_rpc, experts_per_agent, split_counts
from berth.memory.estimate import estimate
from tests.unit.test_memory_estimate import EMBD, N_FF, N_LAYER, OUT, write_model

A, B = "10.0.0.2:7070", "10.0.0.3:7070"
EXPERTS = 4 * N_FF * 64 * 4  # one layer's ffn_up_exps: 4 experts x 128 x 64 f32
ATTN = 16384


def rpc_config(placement: str = "experts", extra: str = "", cmd_extra: str = "") -> str:
    return textwrap.dedent(f"""\
        apiKeys: [gateway-key]
        models:
          m:
            cmd: llama-server -m /models/m.gguf --port ${{PORT}} {cmd_extra}
            rpc:
              agents: ["{A}", "{B}"]
              placement: {placement}
        """) + textwrap.indent(textwrap.dedent(extra), " " * 6)


def placed(tmp_path, placement: str, offers=(0, 0), extra: str = "", cmd: str = "", local_gpus=(),
           endpoints=("10.0.0.2:41001", "10.0.0.3:41002")):
    model = write_model(tmp_path / "moe.gguf", moe_experts=4)
    spec = parse_config(rpc_config(placement, extra)).models["m"]
    assert spec.rpc is not None
    args = LlamaServerArgs.parse(["llama-server", "-m", str(model), "-c", "512", *cmd.split()])
    header = read_gguf_header(model)
    apply_rpc(args, spec.rpc, RpcTargets(endpoints, offers, local_gpus), [t.name for t in header.tensors], N_LAYER)
    return args, header


def test_the_rpc_section_checks_what_it_can():
    spec = parse_config(rpc_config(extra="layers: {'10.0.0.2:7070': '0-1', '10.0.0.3:7070': 2}\n")).models["m"]
    assert spec.rpc is not None
    assert spec.rpc.agents == (A, B) and spec.rpc.placement == "experts"
    assert spec.rpc.layer_ranges == ((A, 0, 1), (B, 2, 2))
    cases = [
        (rpc_config().replace(f'"{B}"', '"10.0.0.3"'), "must be HOST:PORT"),
        (rpc_config().replace(f'"{B}"', f'"{A}"'), "listed twice"),
        (rpc_config("layers", "layers: {'10.0.0.2:7070': '0-1'}\n"), "layer ranges are for placement: experts"),
        (rpc_config(extra="layers: {'10.0.0.9:7070': '0-1'}\n"), "is not one of rpc.agents"),
        (rpc_config(extra="layers: {'10.0.0.2:7070': '3-1'}\n"), "is not a layer range"),
        (rpc_config(extra="layers: {'10.0.0.2:7070': '0-2', '10.0.0.3:7070': '2-3'}\n"), "overlap"),
        (rpc_config(cmd_extra="--rpc 1.2.3.4:5"), "remove --rpc from cmd"),
        (rpc_config("stripes"), "placement"),
    ]
    for text, words in cases:
        with pytest.raises(ConfigError, match=words):
            parse_config(text, "rpc.yaml")
    assert device_key(f"rpc:{A}") == f"rpc:{A}"


def test_the_agents_key_is_a_secret_of_its_own_never_a_client_key():
    """A client key that doubled as the agents' key let every chat client lease raw rpc servers."""
    keyless = parse_config(rpc_config())
    assert keyless.models["m"].rpc.api_key == ""  # not the gateway's first apiKeys entry
    assert any("models.m.rpc.apiKey: not set" in w and "${env.BERTH_AGENT_KEY}" in w and "--api-key" in w
               for w in keyless.warnings), keyless.warnings
    shared = parse_config(rpc_config(extra="apiKey: gateway-key\n"))
    assert shared.models["m"].rpc.api_key == "gateway-key"
    assert any("models.m.rpc.apiKey: also one of apiKeys" in w for w in shared.warnings), shared.warnings
    own = parse_config(rpc_config(extra="apiKey: agents-own-key\n"))
    assert own.models["m"].rpc.api_key == "agents-own-key" and not any("rpc.apiKey" in w for w in own.warnings)
    local = parse_config(rpc_config().replace(A, "127.0.0.1:7070").replace(B, "localhost:7071"))
    assert not any("rpc.apiKey" in w for w in local.warnings)  # a keyless agent may listen on loopback


def test_split_counts_follow_the_offers_and_share_evenly_without_any():
    assert split_counts(4, [3, 1]) == [3, 1]
    assert split_counts(5, [1, 1]) == [3, 2]  # ties go to the earlier device
    assert split_counts(4, [0, 0]) == [2, 2]
    assert sum(split_counts(61, [7, 5, 3])) == 61


def test_experts_placement_sends_expert_tensors_to_agents_in_proportion_and_keeps_layers_here(tmp_path):
    args, header = placed(tmp_path, "experts", offers=(3 << 30, 1 << 30))
    argv = args.to_argv()
    assert argv[1:3] == ["--rpc", "10.0.0.2:41001,10.0.0.3:41002"]  # before the -ot that names them
    assert args.get("override_tensor") == [
        r"blk\.(0|1|2)\.ffn_(gate|up|down|gate_up)_exps\.=RPC0[10.0.0.2:41001],"
        r"blk\.(3)\.ffn_(gate|up|down|gate_up)_exps\.=RPC0[10.0.0.3:41002]"]
    assert args.get("n_gpu_layers") == "0"
    plan = estimate(header, args)
    assert plan.devices["rpc:10.0.0.2:41001"].weights_bytes == 3 * EXPERTS
    assert plan.devices["rpc:10.0.0.3:41002"].weights_bytes == EXPERTS
    assert plan.devices["host"].weights_bytes == EMBD + N_LAYER * ATTN + OUT
    assert plan.devices["rpc:10.0.0.2:41001"].kv_bytes == 0  # attention, and so the KV cache, stays here
    assert plan.devices["rpc:10.0.0.2:41001"].compute_bytes > 0


def test_experts_placement_takes_explicit_ranges_and_refuses_whole_layers_without_a_gpu(tmp_path):
    args, _ = placed(tmp_path, "experts", extra="layers: {'10.0.0.3:7070': '1-2'}\n")
    assert args.get("override_tensor") == [r"blk\.(1|2)\.ffn_(gate|up|down|gate_up)_exps\.=RPC0[10.0.0.3:41002]"]
    with pytest.raises(PlacementError, match="remove -ngl"):
        placed(tmp_path, "experts", cmd="-ngl 99")
    with_gpu, _ = placed(tmp_path, "experts", cmd="-ngl 99", local_gpus=(8 << 30,))
    assert with_gpu.get("tensor_split") == "0,0,1"  # whole layers on this machine's GPU, none on the agents
    dense = write_model(tmp_path / "dense.gguf")
    with pytest.raises(PlacementError, match="use placement: layers"):
        experts_per_agent(parse_config(rpc_config()).models["m"].rpc, RpcTargets((A, B), (0, 0)),
                          [t.name for t in read_gguf_header(dense).tensors])


def test_layers_placement_splits_whole_layers_and_their_kv_by_counts(tmp_path):
    args, header = placed(tmp_path, "layers", offers=(3 << 30, 2 << 30))
    assert (args.get("n_gpu_layers"), args.get("tensor_split")) == ("5", "3,2")  # 4 layers + output
    plan = estimate(header, args)
    first, second = plan.devices["rpc:10.0.0.2:41001"], plan.devices["rpc:10.0.0.3:41002"]
    assert first.weights_bytes == 3 * (ATTN + EXPERTS)
    assert second.weights_bytes == ATTN + EXPERTS + OUT
    per_layer_kv = 512 * 2 * 16 * 2  # cells x kv heads x (k + v dims) x f16
    assert (first.kv_bytes, second.kv_bytes) == (3 * per_layer_kv, per_layer_kv)
    assert plan.devices["host"].weights_bytes == EMBD and plan.devices["host"].kv_bytes == 0
    with pytest.raises(PlacementError, match="remove -ts"):
        placed(tmp_path, "layers", cmd="-ts 1,1")


def test_custom_placement_points_the_users_rules_at_the_leased_servers(tmp_path):
    args, header = placed(tmp_path, "custom", cmd=rf"-ngl 0 -ot blk\.3\.ffn_up_exps\.=RPC0[{B}]")
    assert args.get("override_tensor") == [r"blk\.3\.ffn_up_exps\.=RPC0[10.0.0.3:41002]"]
    assert args.get("rpc") == "10.0.0.3:41002"  # A holds nothing: no server of its in --rpc
    plan = estimate(header, args)
    assert plan.devices["rpc:10.0.0.3:41002"].weights_bytes == EXPERTS
    assert "rpc:10.0.0.2:41001" not in plan.devices
    spread, _ = placed(tmp_path, "custom", cmd="-ngl 99")  # llama.cpp spreads layers over every device itself
    assert spread.get("rpc") == "10.0.0.2:41001,10.0.0.3:41002"


def test_only_agents_a_placement_puts_something_on_get_a_server(tmp_path):
    """An rpc server that holds nothing still costs its agent a process and a lease: such agents are left out
    of --rpc, so their plan is 0 bytes and the gateway leases nothing there."""
    experts, header = placed(tmp_path, "experts", offers=(1, 8 << 30))  # too little for a layer's experts
    assert experts.get("rpc") == "10.0.0.3:41002"
    assert set(estimate(header, experts).devices) == {"host", "rpc:10.0.0.3:41002"}
    layers, _ = placed(tmp_path, "layers", offers=(1, 8 << 30))
    assert (layers.get("rpc"), layers.get("tensor_split")) == ("10.0.0.3:41002", "5")
    # the run leases by the plan; a placement that still needs an agent left unleased is refused by name
    unleased = (None, "10.0.0.3:41002")
    assert placed(tmp_path, "experts", offers=(1, 8 << 30), endpoints=unleased)[0].get("rpc") == "10.0.0.3:41002"
    with pytest.raises(PlacementError, match=f"rpc agent {A} holds part of this model, but this run leased nothing"):
        placed(tmp_path, "experts", offers=(1, 1), endpoints=unleased)
