"""Shared fixtures: the real data once per session, small synthetic data, a tiny study plan."""
import contextlib
import dataclasses
import resource
import signal

import numpy as np
import pytest

import preprocessing  # the repository root is on the path through pytest.ini's pythonpath


@pytest.fixture(scope="session")
def real_splits() -> preprocessing.Splits:
    """The real 54k / 6k / 10k splits. The README's commands install the data before the tests run."""
    return preprocessing.load_splits(download=False)


def make_synthetic_splits(n_train: int = 600, n_eval: int = 200, seed: int = 0) -> preprocessing.Splits:
    """Learnable fake data: each class is a fixed random template plus noise, in [0, 1]. Tests import it
    (`from conftest import make_synthetic_splits`) for other sizes."""
    rng = np.random.default_rng(seed)
    templates = rng.random((preprocessing.NUM_CLASSES, preprocessing.INPUT_DIM), dtype=np.float32)

    def make(n):
        y = np.arange(n) % preprocessing.NUM_CLASSES
        rng.shuffle(y)
        noise = rng.normal(0, 0.3, (n, preprocessing.INPUT_DIM)).astype(np.float32)
        return np.clip(templates[y] + noise, 0, 1), y.astype(np.int64)
    return preprocessing.Splits(*make(n_train), *make(n_eval), *make(n_eval))


@pytest.fixture(scope="session")
def synthetic_splits() -> preprocessing.Splits:
    return make_synthetic_splits()


def make_tiny_plan():
    """The quick plan on a few hundred synthetic images: every stage, two levels each, in seconds."""
    import run_experiments as rx
    return dataclasses.replace(
        rx.QUICK_PLAN, mlp_grid=rx.Budget(300, 200, 1), cnn_grid=rx.Budget(100, 100, 1),
        mlp_final=rx.Budget(400, 200, 1), cnn_final=rx.Budget(100, 200, 1))


@pytest.fixture(scope="session")
def tiny_plan():
    return make_tiny_plan()


@contextlib.contextmanager
def file_size_limit(n_bytes: int):
    """A real full disk, in this process: past n_bytes the kernel fails a write with EFBIG (RLIMIT_FSIZE, its
    SIGXFSZ ignored), as a full disk fails it with ENOSPC; the old limit comes back afterwards."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
