from berth.scheduler.core import (
    Action, Admit, GroupPolicy, ModelPolicy, ModelState, ModelView, Reject, Scheduler, Start, Stop,
)

__all__ = ["Action", "Admit", "GroupPolicy", "ModelPolicy", "ModelState", "ModelView", "Reject", "Scheduler",
           "Start", "Stop"]
