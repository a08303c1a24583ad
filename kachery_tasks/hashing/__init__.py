"""Hashing layer: canonical encoding of values (scheme kt1), function identity and task ids.

See docs/hashing.md for the byte-level scheme and what counts as code.
"""

from kachery_tasks.errors import UnhashableArgument
from kachery_tasks.hashing import callables as _callables  # noqa: F401  installs the encoder of callables
from kachery_tasks.hashing.canonical import SCHEME, Hasher, canonical_bytes, hash_value, register_canon
from kachery_tasks.hashing.function_identity import FunctionId, class_id, function_id
from kachery_tasks.hashing.taskid import bind_arguments, task_id

__all__ = [
    "SCHEME",
    "FunctionId",
    "Hasher",
    "UnhashableArgument",
    "bind_arguments",
    "canonical_bytes",
    "class_id",
    "function_id",
    "hash_value",
    "register_canon",
    "task_id",
]
