"""Data pipeline: IDX parsing and its failures, file search order, verified download, splits."""
import gzip
import hashlib
import io
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cli
import preprocessing as pp
from preprocessing import DataError, IdxFile

REPO = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def spec_for(raw: bytes, name: str, magic: int, shape: tuple) -> IdxFile:
    gz = gzip.compress(raw, mtime=0)
    return IdxFile(name, magic, shape, hashlib.md5(gz).hexdigest(), hashlib.sha256(raw).hexdigest())


@pytest.fixture
def tiny_images():
    array = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    raw = idx_bytes(array, 2051)
    return array, raw, spec_for(raw, "tiny-images-idx3-ubyte", 2051, (5, 28, 28))


# --------------------------------------------------------------------------- parsing and its failures

@pytest.mark.parametrize("compress", [False, True])
def test_good_file_parses_exactly(tmp_path, tiny_images, compress):
    array, raw, spec = tiny_images
    path = tmp_path / ("f.gz" if compress else "f")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    np.testing.assert_array_equal(pp.read_idx_file(path, spec), array)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-100], "truncated"),
    (lambda raw: raw[:6], "truncated"),
    (lambda raw: raw + b"\0", "trailing data"),
    (lambda raw: (2049).to_bytes(4, "big") + raw[4:], "wrong magic number"),
    (lambda raw: raw[:4] + (6).to_bytes(4, "big") + raw[8:], "dimensions"),
    (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "checksum mismatch"),
])
def test_damaged_file_gives_one_line_error_naming_file(tmp_path, tiny_images, damage, message):
    _, raw, spec = tiny_images
    path = tmp_path / "damaged-idx3-ubyte"
    path.write_bytes(damage(raw))
    with pytest.raises(DataError, match=message) as info:
        pp.read_idx_file(path, spec)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_corrupt_gzip_is_a_data_error(tmp_path, tiny_images):
    _, raw, spec = tiny_images
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(DataError, match="cannot read"):
        pp.read_idx_file(path, spec)


def gzip_bomb(path: Path, head: bytes, gigabytes: int) -> Path:
    """A real gzip file of a few MB that unpacks to `head` and then `gigabytes` GB of zeros: members
    concatenated, as `cat a.gz b.gz` makes them, one 64 MB member of zeros compressed once, repeated."""
    zeros = gzip.compress(bytes(64 << 20), mtime=0)
    with open(path, "wb") as f:
        f.write(gzip.compress(head, mtime=0))
        for _ in range(gigabytes * 16):
            f.write(zeros)
    return path


def limited_memory(megabytes: int):
    """preexec_fn of a subprocess whose address space is capped: an allocation past it fails for real."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (megabytes << 20, megabytes << 20))


def test_a_header_is_refused_before_its_body_is_read(tmp_path):
    spec = pp.FILES["train_images"]
    huge = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2**32 - 1, 28, 28))
    for head, message in ((huge, "dimensions"), (b"\x00\x00\x08\x01" + bytes(4), "wrong magic number")):
        path = gzip_bomb(tmp_path / "f.gz", head, 1)
        start = time.perf_counter()
        with pytest.raises(DataError, match=message):
            pp.read_idx_file(path, spec)
        assert time.perf_counter() - start < 1


@pytest.mark.parametrize("head, message", [
    ((2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (60000, 28, 28)), "trailing data"),
    (b"junk", "wrong magic number"),
])
def test_a_gzip_bomb_is_one_line_quickly_in_bounded_memory(tmp_path, head, message):
    """6 GB of zeros behind a header that declares 47 MB (or a junk header): refused after reading at most
    the declared size, under a 400 MB address-space limit (the script and numpy alone take 150 MB)."""
    gzip_bomb(tmp_path / (pp.FILES["train_images"].name + ".gz"), head, 6)
    for spec in list(pp.FILES.values())[1:]:
        (tmp_path / spec.name).write_bytes(b"")
    start = time.perf_counter()
    result = run_cli("--data-dir", str(tmp_path), preexec_fn=limited_memory(400))
    assert time.perf_counter() - start < 20
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("preprocessing.py: error: ") and message in result.stderr


def test_out_of_memory_is_one_line():
    """The data need 600 MB of address space; under 300 MB numpy's allocation fails for real."""
    result = run_cli("--no-download", preexec_fn=limited_memory(300))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("preprocessing.py: error: out of memory") and result.stderr.count("\n") == 1




# --------------------------------------------------------------------------- finding and downloading

def fake_dataset(folder: Path, compress=True, first_label=0):
    """Four tiny IDX files and the specs that make them 'official'; the labels are balanced unless the first
    one is changed to `first_label`."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {"train_images": (20, 28, 28), "train_labels": (20,),
              "test_images": (10, 28, 28), "test_labels": (10,)}
    specs, blobs = {}, {}
    for key, shape in shapes.items():
        magic = 2051 if "images" in key else 2049
        array = (np.arange(shape[0]) % 10 if magic == 2049 else rng.integers(0, 256, shape)).reshape(shape)
        if magic == 2049:
            array[0] = first_label
        raw = idx_bytes(array, magic)
        name = pp.FILES[key].name
        specs[key] = spec_for(raw, name, magic, shape)
        blobs[name + ".gz"] = gzip.compress(raw, mtime=0)
        if compress:
            (folder / (name + ".gz")).write_bytes(blobs[name + ".gz"])
    return specs, blobs


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """Point every search location into tmp_path."""
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(pp, "DEFAULT_DATA_DIR", tmp_path / "repo-data")
    monkeypatch.setattr(pp, "SYSTEM_DATA_DIR", tmp_path / "system")
    return tmp_path


def test_search_order(isolated, monkeypatch):
    specs, _ = fake_dataset(isolated / "system")
    monkeypatch.setattr(pp, "FILES", specs)
    assert pp.find_data_dir(download=False) == isolated / "system"
    fake_dataset(isolated / "repo-data")
    assert pp.find_data_dir(download=False) == isolated / "repo-data"
    fake_dataset(isolated / "env")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(isolated / "env"))
    assert pp.find_data_dir(download=False) == isolated / "env"
    assert pp.find_data_dir(isolated / "system", download=False) == isolated / "system"


@pytest.mark.parametrize("first_label, counts", [(1, "[1, 3, 2, 2, 2, 2, 2, 2, 2, 2]"),
                                                 (10, "[1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1]")])
def test_unbalanced_or_out_of_range_labels_are_refused(isolated, monkeypatch, first_label, counts):
    """Files whose checksums match the specs (as a substituted copy's would) but whose labels are not 10 classes
    of equal size."""
    specs, _ = fake_dataset(isolated / "d", first_label=first_label)
    monkeypatch.setattr(pp, "FILES", specs)
    with pytest.raises(DataError, match=f"train_labels: per-class counts {re.escape(counts)}, expected 2 of each"):
        pp.load_raw(isolated / "d", download=False)


def test_explicit_folder_without_files_is_an_error(isolated):
    with pytest.raises(DataError, match="not all there"):
        pp.find_data_dir(isolated / "empty", download=False)


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_is_verified_then_renamed(isolated, monkeypatch):
    specs, blobs = fake_dataset(isolated / "source", compress=False)
    monkeypatch.setattr(pp, "FILES", specs)
    monkeypatch.setattr(pp.urllib.request, "urlopen",
                        lambda url, timeout: FakeResponse(blobs[url.rsplit("/", 1)[1]]))
    assert pp.find_data_dir() == isolated / "repo-data"
    assert sorted(p.name for p in (isolated / "repo-data").iterdir()) == sorted(blobs)


def test_bad_download_leaves_nothing_that_looks_complete(isolated, monkeypatch):
    specs, blobs = fake_dataset(isolated / "source", compress=False)
    monkeypatch.setattr(pp, "FILES", specs)
    monkeypatch.setattr(pp.urllib.request, "urlopen",
                        lambda url, timeout: FakeResponse(blobs[url.rsplit("/", 1)[1]][:-5]))
    with pytest.raises(DataError, match="could not download") as info:
        pp.find_data_dir()
    assert "MD5" in str(info.value) and "dataset-fashion-mnist" in str(info.value)
    assert not (isolated / "repo-data").exists() or list((isolated / "repo-data").iterdir()) == []


def test_unreachable_host_says_what_to_do(isolated, monkeypatch):
    def refuse(url, timeout):
        raise OSError("connection refused")
    monkeypatch.setattr(pp.urllib.request, "urlopen", refuse)
    with pytest.raises(DataError, match="--data-dir"):
        pp.find_data_dir()


# --------------------------------------------------------------------------- splits

def test_official_split_sizes_ranges_and_test_set(real_splits):
    assert sizes(real_splits) == {"train": 54000, "val": 6000, "test": 10000}
    for X in (real_splits.X_train, real_splits.X_val, real_splits.X_test):
        assert X.dtype == np.float32 and X.shape[1] == 784
        assert X.min() == 0.0 and X.max() == 1.0
    np.testing.assert_array_equal(np.bincount(real_splits.y_val), [600] * 10)
    np.testing.assert_array_equal(np.bincount(real_splits.y_test), [1000] * 10)
    assert abs(real_splits.X_train.mean() - 0.286) < 0.002  # the published pixel mean of the training set


def sizes(splits) -> dict[str, int]:
    return {"train": len(splits.y_train), "val": len(splits.y_val), "test": len(splits.y_test)}


def rows(X):
    return {row.tobytes() for row in X}


def test_official_split_is_disjoint_and_deterministic(real_splits, monkeypatch):
    raw = pp.load_raw(download=False)
    monkeypatch.setattr(pp, "load_raw", lambda *a, **k: raw)  # the files once: the split is what is tested
    again = pp.load_splits(download=False)
    np.testing.assert_array_equal(again.y_val, real_splits.y_val)
    np.testing.assert_array_equal(again.X_train[:100], real_splits.X_train[:100])
    other = pp.load_splits(download=False, seed=1)
    assert not np.array_equal(other.y_val, real_splits.y_val)
    # train + val is exactly the official training set, without overlap
    assert len(rows(real_splits.X_train) | rows(real_splits.X_val)) == len(rows(raw["train_images"]))


def test_pooled_split_is_exact_80_10_10_and_disjoint():
    splits = pp.load_splits(split="pooled", download=False, seed=3)
    assert sizes(splits) == {"train": 56000, "val": 7000, "test": 7000}
    for y in (splits.y_val, splits.y_test):
        np.testing.assert_array_equal(np.bincount(y), [700] * 10)
    val, test = rows(splits.X_val), rows(splits.X_test)
    assert not (val & test) and not (val & rows(splits.X_train[:20000]))


def test_stratified_split_is_exact_and_disjoint():
    y = np.repeat(np.arange(10), 70)
    parts = pp.stratified_split(y, (0.8, 0.1, 0.1), seed=0)
    assert [len(p) for p in parts] == [560, 70, 70]
    assert len(np.unique(np.concatenate(parts))) == 700
    for p in parts:
        assert len(set(np.bincount(y[p]))) == 1


def test_subset_is_stratified_and_seeded(synthetic_splits):
    sub = synthetic_splits.subset(100, 50, seed=2)
    assert sizes(sub) == {"train": 100, "val": 50, "test": 50}
    np.testing.assert_array_equal(np.bincount(sub.y_train), [10] * 10)
    np.testing.assert_array_equal(sub.X_train, synthetic_splits.subset(100, 50, seed=2).X_train)
    assert sizes(synthetic_splits.subset(None)) == sizes(synthetic_splits)


def test_image_view_and_standardisation(synthetic_splits):
    images = pp.to_images(synthetic_splits.X_train)
    assert images.shape == (600, 1, 28, 28) and np.shares_memory(images, synthetic_splits.X_train)
    mean, std = pp.standardization_stats(synthetic_splits.X_train)
    standardized = (synthetic_splits.X_train - mean) / std
    assert abs(standardized.mean()) < 1e-5 and abs(standardized.std() - 1) < 1e-4


# --------------------------------------------------------------------------- command line

def run_cli(*args, preexec_fn=None):
    return subprocess.run([sys.executable, str(REPO / "preprocessing.py"), *args],
                          capture_output=True, text=True, preexec_fn=preexec_fn)


def test_cli_prints_summary():
    result = run_cli()
    assert result.returncode == 0, result.stderr
    assert "54000" in result.stdout and "Ankle boot" in result.stdout and "checksums verified" in result.stdout


def test_cli_corrupt_file_is_one_line_and_nonzero(tmp_path):
    for spec in pp.FILES.values():
        (tmp_path / spec.name).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)
    result = run_cli("--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("preprocessing.py: error: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("seed", ["-1", str(cli.MAX_SEED + 1), "x"])
def test_cli_bad_seed_is_a_one_line_usage_error(seed):
    result = run_cli("--seed", seed)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("preprocessing.py: error: argument --seed: ")
