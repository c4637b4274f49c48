from berth.scheduler.core import (
    Action, Admit, Eviction, GroupPolicy, MatrixPolicy, MemoryPolicy, ModelPolicy, ModelState, ModelView, Reject, Scheduler, Start, Stop, StopReason,
)

__all__ = ["Action", "Admit", "Eviction", "GroupPolicy", "MatrixPolicy", "MemoryPolicy", "ModelPolicy", "ModelState", "ModelView", "Reject",
           "Scheduler", "Start", "Stop", "StopReason"]
