"""Shared pytest settings."""

import warnings

import pytest


@pytest.fixture(autouse=True)
def _no_lazy_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Lazy modules are a new feature")
        yield
