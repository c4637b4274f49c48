from berth.scheduler.core import (
    Action, Admit, Client, Eviction, GroupPolicy, MatrixPolicy, MemoryPolicy, ModelPolicy, ModelState, ModelView,
    QueuePolicy, Reject, Scheduler, Start, Stop, StopReason, StopWhy, Wake,
)

__all__ = ["Action", "Admit", "Client", "Eviction", "GroupPolicy", "MatrixPolicy", "MemoryPolicy", "ModelPolicy",
           "ModelState", "ModelView", "QueuePolicy", "Reject", "Scheduler", "Start", "Stop", "StopReason", "StopWhy", "Wake"]
