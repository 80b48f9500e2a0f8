"""Shared fixtures: the real data once per session, small synthetic data, a tiny study plan."""
import dataclasses

import pytest

import preprocessing  # the repository root is on the path through pytest.ini's pythonpath


@pytest.fixture(scope="session")
def real_splits() -> preprocessing.Splits:
    """The real 54k / 6k / 10k splits. The README's commands install the data before the tests run."""
    return preprocessing.load_splits(download=False)


@pytest.fixture(scope="session")
def synthetic_splits() -> preprocessing.Splits:
    return preprocessing.synthetic_splits()


@pytest.fixture(scope="session")
def tiny_plan():
    """The quick plan on a few hundred synthetic images: every stage, two levels each, in seconds."""
    import run_experiments as rx
    return dataclasses.replace(
        rx.QUICK_PLAN, mlp_grid=rx.Budget(300, 200, 1), cnn_grid=rx.Budget(100, 100, 1),
        mlp_final=rx.Budget(400, 200, 1), cnn_final=rx.Budget(100, 200, 1))
