import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "long", max_examples=5000, stateful_step_count=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("KVCORE_HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip `cuda`-marked tests unless CuPy sees a GPU."""
    if not any(item.get_closest_marker("cuda") for item in items):
        return
    from kvcore.backends import cuda_available

    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
