"""Shared pytest settings: one torch thread per xdist worker, the ``slow`` marker."""

import os
import warnings

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # each worker takes a core: torch's own threads on top oversubscribe them (OpenMP threads
    # spin while they wait; measured 6x slower on 2 cores with 2 workers x 2 threads)
    torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow",
        action="store_true",
        help="also run the cases marked slow (the full problem cross product)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: a redundant crossing of the problem list (its code paths are covered by the "
        "default run); run with --runslow or BACKPACK_TEST_SLOW=1",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if config.getoption("--runslow") or os.environ.get("BACKPACK_TEST_SLOW") == "1":
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(autouse=True)
def _no_lazy_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Lazy modules are a new feature")
        yield
