from berth.scheduler.actions import Action, Admit, Reject, Start, Stop, StopReason, StopWhy, Wake
from berth.scheduler.core import Scheduler
from berth.scheduler.policies import (
    Client,
    Eviction,
    GroupPolicy,
    MatrixPolicy,
    MemoryPolicy,
    ModelPolicy,
    QueuePolicy,
)
from berth.scheduler.records import ModelState, ModelView

__all__ = ["Action", "Admit", "Client", "Eviction", "GroupPolicy", "MatrixPolicy", "MemoryPolicy", "ModelPolicy",
           "ModelState", "ModelView", "QueuePolicy", "Reject", "Scheduler", "Start", "Stop", "StopReason", "StopWhy", "Wake"]
