from berth.scheduler.core import (
    Action, Admit, GroupPolicy, MemoryPolicy, ModelPolicy, ModelState, ModelView, Reject, Scheduler, Start, Stop,
)

__all__ = ["Action", "Admit", "GroupPolicy", "MemoryPolicy", "ModelPolicy", "ModelState", "ModelView", "Reject",
           "Scheduler", "Start", "Stop"]
