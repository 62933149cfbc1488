"""The driver's judgement of whether any actor can still generate (launch/train.py): an actor whose vLLM
engine died while its process lives is re-placed; when no actor can generate, the training step stops
with an error naming every actor instead of waiting for its deadline."""

from launch.train import _stopped_reason, no_generation_reason


def test_stopped_reason_from_actor_stats():
    assert _stopped_reason({"error": None, "engine_dead": False}) == ""
    assert _stopped_reason({"error": "RuntimeError('x')"}) == "RuntimeError('x')"
    why = _stopped_reason({"error": "EngineDeadError('gone')", "engine_dead": True})
    assert why.startswith("its vLLM engine died") and "gone" in why
    assert _stopped_reason({"engine_dead": True}) == "its vLLM engine died"


def test_one_generating_actor_is_enough():
    stopped = {"error": "EngineDeadError()", "engine_dead": True}
    assert no_generation_reason({"actor0"}, {"actor1": {"error": None}}) == ""
    assert no_generation_reason(set(), {"actor0": stopped, "actor1": {"error": None}}) == ""
    assert no_generation_reason(set(), {"actor0": stopped, "actor1": None}) == ""  # slow is not stopped


def test_no_generating_actor_names_each_one():
    stopped = {"error": "EngineDeadError()", "engine_dead": True}
    msg = no_generation_reason({"actor0"}, {"actor1": stopped})
    assert msg.startswith("no actor is generating")
    assert "actor0: the process died" in msg and "actor1: its vLLM engine died" in msg
    msg = no_generation_reason(set(), {"actor0": stopped, "actor1": {"error": "ValueError('bad')"}})
    assert "actor0: its vLLM engine died" in msg and "actor1: ValueError('bad')" in msg
