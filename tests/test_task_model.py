"""The model classes: a task's options in one frozen ``TaskOptions``; ``Job(..., id=, action_key=)``."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from kachery_tasks.errors import UserError
from kachery_tasks.tasks import pure
from kachery_tasks.tasks.settings import CallSettings
from kachery_tasks.tasks.task import Job, Task, TaskOptions


def _double(x):
    return 2 * x


def test_task_options_are_frozen_and_changed_with_replace():
    options = TaskOptions(version="2", ignore_globals=["b", "a"], rtol=1e-6)
    assert options.ignore_globals == ("a", "b")  # sorted: function_id's cache key
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.version = "3"  # type: ignore[misc]
    changed = dataclasses.replace(options, version="3", call_options={"force": True})
    assert (changed.version, changed.rtol, changed.call_options) == ("3", 1e-6, {"force": True})
    assert options.version == "2" and options.call_options == {}
    with pytest.raises(UserError, match="version= takes a string"):
        dataclasses.replace(options, version=3)  # checked as the constructor checks
    with pytest.raises(UserError):
        TaskOptions(codec="no-such-codec")
    assert hash(options) == hash(TaskOptions(version="2", ignore_globals=("a", "b"), rtol=1e-6))


def test_task_takes_options_or_their_fields_and_shows_them_as_attributes():
    task = Task(_double, "pure", version="2", name="lab.double", codec="json", rtol=0.1)
    assert task.task_options == TaskOptions(version="2", name="lab.double", codec="json", rtol=0.1)
    assert (task.version, task.name_override, task.codec, task.rtol, task.atol) == ("2", "lab.double", "json", 0.1, None)
    assert task.name == "lab.double"
    same = Task(_double, "pure", task.task_options)
    assert same.task_id(1) == task.task_id(1)
    other = Task(_double, "pure", dataclasses.replace(task.task_options, version="3"))
    assert other.task_id(1) != task.task_id(1)
    with pytest.raises(UserError, match="no codec"):
        Task(_double, "action", codec="json")
    with pytest.raises(TypeError):
        Task(_double, "pure", no_such_option=1)


def test_options_keep_the_task_options_and_add_call_options():
    task = pure(version="5", codec="json")(_double)
    forced = task.options(force=True).options(cache=False)
    assert forced.task_options == dataclasses.replace(task.task_options, call_options={"force": True, "cache": False})
    assert task.call_options == {}
    assert forced.job(1).settings.force and not forced.job(1).settings.cache
    assert forced.task_id(1) == task.task_id(1)  # call options are not the function's identity


def test_a_task_made_in_place_pickles_with_its_options():
    task = Task(_double, "pure", version="7", rtol=0.5, call_options={"force": True})  # not exposed: by value
    back = pickle.loads(pickle.dumps(task))
    assert back.task_options == task.task_options and back.func is _double
    assert back.task_id(3) == task.task_id(3)


def test_job_takes_its_id_and_action_key():
    task = Task(_double, "pure")
    settings = CallSettings.current()
    made = Job(task, {"x": 1}, settings)
    assert made.action_key is None and made.id == task.task_id(1)
    given = Job(task, {}, settings, id="f" * 32, action_key="k1")
    assert given.id == "f" * 32 and given.action_key == "k1"  # the id given is the id
    back = pickle.loads(pickle.dumps(given))
    assert (back.id, back.action_key, back.args) == ("f" * 32, "k1", {})
    with pytest.raises(TypeError):
        Job(task, {}, settings, "f" * 32)  # id and action_key by keyword only
    assert not hasattr(made, "__dict__")  # slots: one made per call, on the hit path
