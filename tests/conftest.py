"""Shared test setup. Area-specific fixtures live in tests/<area>/conftest.py."""

import os

import pytest

# Tests never touch the model hub; tiny models are built locally and cached.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Builds start from scratch unless a test turns the build cache on (tests/test_build_cache.py): a
# cached graph would hide what a test changes outside the cache key (a monkeypatched export).
os.environ.setdefault("AUTODEPLOY_BUILD_CACHE", "0")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU the Triton kernels run in Triton's interpreter (tests/custom_ops/test_triton_interpret.py),
# so a kernel change that breaks the math fails the CPU suite. It must be on before triton is imported.
if "TRITON_INTERPRET" not in os.environ and not _has_cuda():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    import torch

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs at least 2 CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and n_gpus < 1:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and n_gpus < 2:
            item.add_marker(skip_multi)


@pytest.fixture(autouse=True)
def _fresh_launcher_env():
    """A process reads its launcher's rank variables once (distributed/env.launcher_env); a test that
    sets them (monkeypatch) must not leave its reading to the next test."""
    from autodeploy.distributed.env import launcher_env

    launcher_env.cache_clear()
    yield
    launcher_env.cache_clear()
