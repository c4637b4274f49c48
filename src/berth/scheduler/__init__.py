from berth.scheduler.core import (
    Action, Admit, GroupPolicy, MemoryPolicy, ModelPolicy, ModelState, ModelView, Reject, Scheduler, Start, Stop, StopReason,
)

__all__ = ["Action", "Admit", "GroupPolicy", "MemoryPolicy", "ModelPolicy", "ModelState", "ModelView", "Reject",
           "Scheduler", "Start", "Stop", "StopReason"]
