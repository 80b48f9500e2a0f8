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


@pytest.fixture(scope="session")
def quick_study(tmp_path_factory, real_splits):
    """The whole `--quick` study, run once per session and shared by the study and report tests:
    (results dir, run_experiments.Study)."""
    import run_experiments as rx
    out = tmp_path_factory.mktemp("quick")
    study = rx.run_study(rx.Options(results_dir=out, quick=True, seeds=rx.QUICK_SEEDS, report=False),
                         splits=real_splits)
    return out, study


@pytest.fixture(scope="session")
def quick_results(quick_study) -> Path:
    return quick_study[0]
