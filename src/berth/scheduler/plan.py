"""The plan pass that ends every event: serve the waiting queue in order, then stop idle models whose time
is up, then start the models TTL stops return to (DESIGN.md, "The plan pass"). It moves the scheduler's
records and returns the actions, in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from berth.core.errors import ModelUnloaded
from berth.scheduler.actions import Action, Admit, Reject, StopReason, StopWhy
from berth.scheduler.eviction import MemoryLedger, MemoryRoom, Swaps
from berth.scheduler.records import IDLE_CAPABLE, ModelState
from berth.scheduler.turns import Waiting, is_due

if TYPE_CHECKING:
    from berth.scheduler.core import Scheduler


@dataclass
class PlanPass:
    """One pass over the scheduler's state at `now`."""

    s: Scheduler
    now: float
    swaps: Swaps
    room: MemoryRoom
    ledger: MemoryLedger
    actions: list[Action] = field(default_factory=list)
    draining: set[str] = field(default_factory=set)  # ready models that must stop so an earlier request's model can start
    claimed: list[str] = field(default_factory=list)  # stopped (or sleeping) models earlier requests wait to start

    @classmethod
    def of(cls, s: Scheduler, now: float) -> PlanPass:
        room = MemoryRoom(s.memory, s.models)
        return cls(s, now, Swaps(s.models, s.groups, s.matrix), room, room.ledger())

    def run(self) -> list[Action]:
        self.s.clock = self.now
        priority = {model_id: m.policy.priority for model_id, m in self.s.models.items()}
        for request_id, waiting in self.s.waiting.in_order(self.now, self.s.queue.max_wait, priority.__getitem__):
            self._serve(request_id, waiting)
        self._stop_idle()
        self._return()
        return self.actions

    # -- the queue ----------------------------------------------------------------------

    def _serve(self, request_id: int, waiting: Waiting) -> None:
        """Admit the request, claim its model's start (stopping what is in the way), or leave it waiting."""
        model = waiting.model
        if model in self.s.removed:
            self.s.waiting.discard(request_id)
            self.actions.append(Reject(request_id, model, ModelUnloaded(model, "removed from the config")))
            return
        m = self.s.models[model]
        if m.state is ModelState.READY and model not in self.draining and m.unload_reason is None:
            if waiting.uses_slot and m.policy.parallel and m.in_slots >= m.policy.parallel:
                return  # every slot of its server is busy: it waits for the next, in turn
            self.actions.append(self._admit(request_id))
            return
        if m.state not in (ModelState.STOPPED, ModelState.FAILED, ModelState.SLEEPING) or model in self.claimed:
            return  # waits for the start, the stop, or the drain under way
        too_big = self.room.too_big(model)
        if too_big is not None:
            self.s.waiting.discard(request_id)
            self.actions.append(Reject(request_id, model, too_big))
            return
        if any(self.swaps.clash(model, other) for other in self.claimed):
            return  # an earlier request's swap goes first
        blockers = self.swaps.blockers(model, self.s.running())
        if any(self._keeps_turn(other, waiting) for other in blockers):
            return  # the loaded model serves its queue first (batching)
        room: bool | None = True
        if self.room.scheduled(model):
            room = self._make_room(model, waiting)
            if room is None:
                return  # the same, for a model that must make room by memory
        self.claimed.append(model)
        self._swap_out(model, blockers)
        if not blockers and room:
            self.actions.append(self.s.models[model].begin_start(model))

    def _admit(self, request_id: int) -> Admit:
        waiting = self.s.waiting.admit(request_id)
        model = waiting.model
        self.s.admitted[request_id] = model
        m = self.s.models[model]
        m.in_flight += 1
        if waiting.uses_slot:
            self.s.in_slots.add(request_id)
            m.in_slots += 1
        return Admit(request_id, model)

    def _keeps_turn(self, other: str, waiting: Waiting) -> bool:
        """Whether running `other` keeps serving instead of stopping for the `waiting` request's model:
        it is ready and has work (requests in flight or waiting for it), and either is within its
        `min_residency` or the request has not yet waited `max_wait`."""
        o = self.s.models[other]
        if o.state is not ModelState.READY or other in self.draining:
            return False
        if not o.in_flight and not self.s.waiting.count(other):
            return False
        if self.now < o.ready_at + self.s.queue.min_residency:
            return True
        return not is_due(waiting, self.now, self.s.queue.max_wait)

    def _swap_out(self, model: str, blockers: list[str]) -> None:
        """Drain the models `model`'s start conflicts with; the idle ones stop now."""
        for other in blockers:
            o = self.s.models[other]
            if o.state in IDLE_CAPABLE:
                self.draining.add(other)
                if o.in_flight == 0:
                    why = StopWhy(for_model=model, idle_s=o.idle_for(self.now), rule=self.swaps.rule,
                                  freed=dict(o.held()))
                    self.actions.append(o.begin_stop(other, StopReason.SWAP, why))

    def _make_room(self, model: str, waiting: Waiting) -> bool | None:
        """Make room for `model` by planned memory. True when it can start now, False when it waits for
        the stops begun here (or under way), None when making room would stop a model that keeps its turn."""
        def busy(other: str) -> bool:
            return self.s.models[other].in_flight > 0 or self.s.waiting.count(other) > 0
        plan = self.room.plan(model, self.ledger, self.draining, busy)
        if plan.fits_now:
            assert plan.load is not None
            self.ledger.take(plan.load)
            return True
        if any(self._keeps_turn(o, waiting) for o in plan.victims):
            return None
        short = self.ledger.short_now(plan.load) if plan.load is not None else None
        if plan.load is not None:
            self.ledger.reserve(plan.load, plan.victims)
        for other in plan.victims:
            self.draining.add(other)
            o = self.s.models[other]
            if o.in_flight == 0:
                self.actions.append(o.begin_stop(other, StopReason.MEMORY, plan.why(o, other, short, self.now)))
        return plan.start

    # -- after the queue ----------------------------------------------------------------

    def _stop_idle(self) -> None:
        """Stop idle models with an API unload pending, removed from the config, or past their TTL."""
        for model_id, m in self.s.models.items():
            if m.state not in IDLE_CAPABLE or m.in_flight:
                continue
            if m.unload_reason is not None:
                self.actions.append(m.begin_stop(model_id, m.unload_reason, m.idle_why(self.now)))
            elif model_id in self.s.removed:
                self.actions.append(m.begin_stop(model_id, StopReason.RELOAD, m.idle_why(self.now)))
            else:
                deadline = m.ttl_deadline(self.s.waiting.count(model_id))
                if deadline is not None and self.now >= deadline:
                    self.actions.append(m.begin_stop(model_id, StopReason.TTL, m.idle_why(self.now, "ttl")))

    def _return(self) -> None:
        returning, self.s.returning = self.s.returning, set()
        for target in returning:
            if self._may_return_to(target):
                self.actions.append(self.s.models[target].begin_start(target))

    def _may_return_to(self, target: str) -> bool:
        """A model's `return_to` starts after its TTL stop only when nothing waits and it needs nothing
        stopped: no request is delayed and no other model loses its place for it."""
        t = self.s.models.get(target)
        if (t is None or len(self.s.waiting) or self.s.closing or target in self.s.removed
                or t.state not in (ModelState.STOPPED, ModelState.FAILED)
                or (t.retry_at is not None and self.now < t.retry_at)
                or self.room.too_big(target) is not None or self.swaps.blockers(target, self.s.running())):
            return False
        if not self.room.scheduled(target):
            return True
        return self.room.may_return(target, self.ledger)
