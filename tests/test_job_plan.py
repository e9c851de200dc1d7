"""One decision per job: the planner alone turns a request into parameters, encoder and memory policy."""

import pytest
from pydantic import ValidationError

from deployments.job_plan import Planner
from deployments.precedence import ParamOverrides


def planner(replica_policy="resident", honor=False, encoders=("cpu",), pins=None, defaults=None) -> Planner:
    return Planner(ParamOverrides(**(pins or {})), ParamOverrides(**(defaults or {})), list(encoders), replica_policy, honor)


@pytest.mark.parametrize(("replica", "honor", "pins", "requested", "expected"), [
    ("resident", False, {}, None, "resident"),
    ("resident", False, {}, True, "resident"),  # the request may not choose
    ("resident", True, {}, True, "offload"),  # it may
    ("offload", True, {}, None, "offload"),  # said nothing: the replica's
    ("offload", True, {}, False, "resident"),
    ("offload", False, {"offload_model": True}, False, "offload"),  # a pin beats the request
    ("stream", True, {}, False, "stream"),  # a stream replica keeps its policy, and says so from the start
    ("stream", False, {}, None, "stream"),
])
def test_the_memory_policy_is_decided_once_and_recorded_in_the_parameters(replica, honor, pins, requested, expected):
    request = {"prompt": "a fox"} | ({} if requested is None else {"offload_model": requested})
    plan = planner(replica, honor, pins=pins).plan(request)
    assert plan.memory_policy == expected
    assert plan.params.offload_model is (expected != "resident")


@pytest.mark.parametrize(("encoders", "t5_cpu", "expected"), [
    (("cpu",), None, "cpu"), (("cpu", "gpu"), False, "gpu"), (("cpu", "gpu"), True, "cpu"), (("gpu",), True, "gpu"),
])
def test_t5_cpu_picks_a_deployed_encoder(encoders, t5_cpu, expected):
    request = {"prompt": "a fox"} | ({} if t5_cpu is None else {"t5_cpu": t5_cpu})
    plan = planner(encoders=encoders).plan(request)
    assert plan.text_encoder == expected and plan.params.t5_cpu is (expected == "cpu")


def test_pins_beat_the_request_and_say_so_defaults_fill_in_and_the_seed_is_drawn():
    plan = planner(pins={"sample_shift": 5.0}, defaults={"sample_steps": 30}).plan({"prompt": "a fox", "sample_shift": 9})
    assert plan.params.sample_shift == 5.0 and plan.params.sample_steps == 30 and plan.params.seed >= 0
    assert plan.overridden == [{"field": "sample_shift", "requested": 9, "effective": 5.0}]


def test_a_bad_value_is_refused_naming_its_field():
    with pytest.raises(ValidationError, match="sample_steps"):
        planner().plan({"prompt": "a fox", "sample_steps": 0})
