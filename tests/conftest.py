"""Shared fixtures: the real data once per session, and small synthetic data."""
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
