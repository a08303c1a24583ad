"""Tasks: ``@pure``, ``@query``, ``@action``, jobs, the resolver, the action log and explain."""

from .decorators import action, pure, query
from .explain import Explanation, explain
from .recording import TaskFailed
from .resolver import has_result, resolve
from .settings import CallSettings
from .stats import STATS
from .task import ActionResult, Job, Task, TaskOptions, wire
from .tiers.memory import MEMORY

# task.py is the bottom of the engine: the resolver and explain import it, and are handed to it here
wire(resolve=resolve, explain=explain)

__all__ = [
    "MEMORY",
    "STATS",
    "ActionResult",
    "CallSettings",
    "Explanation",
    "Job",
    "Task",
    "TaskFailed",
    "TaskOptions",
    "action",
    "explain",
    "has_result",
    "pure",
    "query",
    "resolve",
]
