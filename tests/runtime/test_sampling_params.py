"""SamplingParams refuses bad values at construction, naming the field (as vLLM does)."""

import pytest

from autodeploy.runtime.sampling_params import SamplingParams


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"top_k": -3}, "top_k"),
    ({"seed": "x"}, "seed"),
    ({"stop": ["", "ok"]}, "stop"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"prompt_logprobs": 2.0}, "prompt_logprobs"),
    ({"prompt_logprobs": 100}, "prompt_logprobs"),
])
def test_bad_values_raise_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        SamplingParams(**kwargs)


def test_good_values_construct():
    for kwargs in ({}, {"temperature": 0}, {"top_k": -1}, {"top_k": 0}, {"top_k": 5, "top_p": 0.1, "seed": 3},
                   {"stop": "x", "stop_token_ids": [2], "max_tokens": 1},
                   {"logprobs": 0, "prompt_logprobs": 0}, {"logprobs": 20, "prompt_logprobs": 20}):
        SamplingParams(**kwargs).check()
