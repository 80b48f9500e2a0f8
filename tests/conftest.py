"""Shared fixtures: the real data once per session, small synthetic data, a tiny study plan."""
import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live at the repo root

import preprocessing  # noqa: E402


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
