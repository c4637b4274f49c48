"""Each model's memory plan, and what running models really use.

The pool asks for plans when the config changes and hears of a better plan
after a model is measured; the gateway reads plans, measurements and devices
for `/running`, `/v1/models` and `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping

from berth.config import BerthConfig, ModelSpec
from berth.core.units import rpc_device
from berth.engine.launch import server_args
from berth.memory.devices import Device, measure_group, parse_buffer_log, weight_files
from berth.memory.planner import MemoryPlanner, ModelMemory, PlanSource
from berth.runtime.agents import AgentDirectory
from berth.runtime.process import ModelProcess

log = logging.getLogger("berth.memory")

MEASURE_INTERVAL = 30.0  # seconds between measurements of running models (peak usage grows with use)

PlanChanged = Callable[[str, ModelMemory], None]
ReadyProcesses = Callable[[], Iterable[tuple[str, ModelProcess]]]


def _respecified(spec: ModelSpec, running: ModelSpec) -> bool:
    """Whether the config's definition of a model now runs another argv than the process it started."""
    current = spec.with_port(running.port) if spec.uses_port and running.port else spec
    return current.argv != running.argv


class MemoryService:
    def __init__(self, planner: MemoryPlanner, agents: AgentDirectory | None = None) -> None:
        self.planner = planner
        self.agents = agents or AgentDirectory()
        self.plans: dict[str, ModelMemory] = {}
        self.measured: dict[str, dict[str, int]] = {}  # peak usage per running model
        self._task: asyncio.Task[None] | None = None

    def plan_all(self, config: BerthConfig) -> dict[str, ModelMemory]:
        self.plans = {spec.id: self.planner.plan(spec) for spec in config.models.values()}
        for model_id, plan in self.plans.items():
            log.debug(f"{model_id}: memory {plan.source} {plan.planned} {plan.detail}")
        return self.plans

    def budgets(self, config: BerthConfig) -> dict[str, int]:
        """The machine's devices, and what each rpc agent that answered offers (its own budget)."""
        return {**self.agents.budgets(), **self.planner.budgets(config)}

    def planned_bytes(self, spec: ModelSpec) -> dict[str, int]:
        plan = self.plans.get(spec.id)
        return dict(plan.planned or {}) if plan else {}

    def forget(self, model_id: str) -> None:
        """The model's process is gone: its measurement no longer describes anything running."""
        self.measured.pop(model_id, None)

    async def measure(self, spec: ModelSpec | None, process: ModelProcess,
                      still_running: Callable[[], bool]) -> ModelMemory | None:
        """Read what a running model uses; return its new plan when `spec` (the config's current
        definition) is what runs, so later starts with the same settings plan with it."""
        if process.pid is None:
            return None
        files = weight_files(server_args(process.planned_argv))
        host_weights = await asyncio.to_thread(self.planner.host_mapped_bytes, process.planned_argv)
        usage = await asyncio.to_thread(measure_group, process.pid, files, host_weights)
        if not still_running() or not usage.get("host"):
            return None
        agents = {rpc_device(endpoint): rpc_device(agent) for endpoint, agent in process.agent_endpoints.items()}
        logged = parse_buffer_log(list(process.output))
        seen_by_nvml = {device for device in usage if device.startswith("gpu")}
        for device, amount in logged.items():
            # GPUs NVML does not see, and rpc agents; the host's own measurement is the fuller figure
            usage.setdefault(agents.get(device, device), amount)
        running = process.spec
        if spec is None or _respecified(spec, running):  # removed, or reloaded with other settings meanwhile
            self.measured[running.id] = usage
            return None
        for gpu in seen_by_nvml:
            await asyncio.to_thread(self.planner.learn_gpu_runtime, spec, process.planned_argv, gpu, usage[gpu],
                                    logged.get(gpu))
        plan = await asyncio.to_thread(self.planner.learn, spec, process.planned_argv, usage)
        if plan.planned != self.plans.get(spec.id, ModelMemory(None, PlanSource.UNKNOWN)).planned:
            log.info(f"{spec.id}: planned memory now {plan.planned} ({plan.source})")
        # the measurement and the plan it makes appear together (a reader never sees one without the other)
        self.measured[running.id], self.plans[spec.id] = usage, plan
        return plan

    async def measure_sleeping(self, process: ModelProcess) -> dict[str, int] | None:
        """What a sleeping model's process group holds now (its anonymous host memory: llama.cpp has unmapped
        the weights; and per GPU what NVML sees): the rest of its plan is free while it sleeps. Kept as the
        latest figure for /running."""
        if process.pid is None:
            return None
        usage = await asyncio.to_thread(measure_group, process.pid)  # its weights are unmapped: anonymous only
        if not usage.get("host"):
            return None
        self.measured[process.spec.id] = usage
        return usage

    def start_measuring(self, ready: ReadyProcesses, specs: Callable[[], dict[str, ModelSpec]],
                        on_plan: PlanChanged) -> None:
        self._task = asyncio.create_task(self._measure_periodically(ready, specs, on_plan))

    async def _measure_periodically(self, ready: ReadyProcesses, specs: Callable[[], dict[str, ModelSpec]],
                                    on_plan: PlanChanged) -> None:
        while True:
            await asyncio.sleep(MEASURE_INTERVAL)
            for model_id, process in list(ready()):
                plan = await self.measure(specs().get(model_id), process,
                                          lambda: any(p is process for _, p in ready()))
                if plan is not None:
                    on_plan(model_id, plan)

    def stop_measuring(self) -> None:
        if self._task:
            self._task.cancel()

    def devices(self, live: dict[str, Device], config: BerthConfig, held: Mapping[str, Mapping[str, int]]
                ) -> dict[str, dict[str, int]]:
        """Per device: total and free now (`live`, from `inventory()`), berth's budget, and what the live
        models are planned to hold (`held`: each one's plan, or what it keeps while sleeping), and the headroom
        kept free besides the budget."""
        budgets = self.budgets(config)
        result = {}
        for name in sorted(set(live) | set(budgets)):
            planned = sum(amounts.get(name, 0) for amounts in held.values())
            device = live.get(name)
            result[name] = {"total_bytes": device.total_bytes if device else 0,
                            "free_bytes": device.free_bytes if device else 0,
                            "budget_bytes": budgets.get(name, 0), "planned_in_use_bytes": planned,
                            "headroom_bytes": config.memory.headroom_bytes}
        return result
