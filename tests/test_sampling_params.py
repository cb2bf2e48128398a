import pytest

from ssd.sampling_params import SamplingParams


def test_defaults_are_valid_and_not_greedy() -> None:
    params = SamplingParams()
    assert params.temperature == 1.0 and params.top_k == -1 and params.top_p == 1.0
    assert params.max_tokens == 64 and params.seed is None and params.ignore_eos is False
    assert not params.greedy


def test_zero_temperature_is_greedy() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0, top_k=5, top_p=0.5).greedy
    assert not SamplingParams(temperature=0.1).greedy


def test_valid_edge_values_are_accepted() -> None:
    SamplingParams(top_k=0)
    SamplingParams(top_k=1)
    SamplingParams(top_p=1.0)
    SamplingParams(top_p=1e-6)
    SamplingParams(max_tokens=1)
    SamplingParams(seed=0)
    SamplingParams(seed=-3)
    SamplingParams(seed=2**70)
    SamplingParams(temperature=2)


def test_slots_reject_unknown_attributes() -> None:
    with pytest.raises(AttributeError):
        SamplingParams().not_a_field = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": "1"}, "temperature must be a finite number"),
        ({"temperature": True}, "temperature must be a finite number"),
        ({"top_k": -2}, "top_k must be -1 or 0"),
        ({"top_k": 2.0}, "top_k must be an int"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": -0.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": float("nan")}, "top_p must be a finite number"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": -5}, "max_tokens must be >= 1"),
        ({"max_tokens": 3.0}, "max_tokens must be an int"),
        ({"seed": 1.5}, "seed must be an int or None"),
        ({"seed": "7"}, "seed must be an int or None"),
        ({"seed": True}, "seed must be an int or None"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool"),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
