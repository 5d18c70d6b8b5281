"""Session-wide engines for the tiny models (see tiny_deployment.py)."""

import pytest

from tiny_deployment import tiny


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny("tiny_llama")


@pytest.fixture(scope="session")
def tiny_mixtral():
    return tiny("tiny_mixtral")


@pytest.fixture(scope="session")
def tiny_hybrid():
    return tiny("tiny_hybrid")


@pytest.fixture(scope="session", params=["tiny_llama", "tiny_mixtral", "tiny_hybrid"])
def tiny_model(request):
    return tiny(request.param)
