"""Fashion-MNIST: find or fetch the official files, parse them, split, scale (assignment Q1, Q2a, Q2b).

Both models get their data from here:

    splits = load_splits()              # 54k train / 6k val (stratified, seeded) / official 10k test
    splits.X_train                      # (54000, 784) float32 in [0, 1]   -- flattened, for the MLP
    to_images(splits.X_train)           # (54000, 1, 28, 28) view          -- for the CNN

Where the four official IDX files come from, first match wins:
  1. `data_dir` (``--data-dir``) or the ``FASHION_MNIST_DIR`` environment variable;
  2. ``./data/fashion-mnist``;
  3. ``/usr/share/datasets/fashion-mnist`` (Debian's package ``dataset-fashion-mnist``);
  4. a download over HTTPS into ``./data/fashion-mnist``, each file checked before use.

Every file, wherever it came from, is checked against the SHA-256 of its decompressed content, so a
corrupt, truncated or substituted file stops with a one-line `DataError` instead of a wrong array.

    python preprocessing.py             # get and verify the data, print a summary
"""
import gzip
import hashlib
import io
import os
import sys
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cli

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIDE = 28
INPUT_DIM = IMAGE_SIDE * IMAGE_SIDE

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data" / "fashion-mnist"
SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_URLS = ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",  # its GitHub
                 "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")  # its original host
WHERE_TO_GET_IT = ("put the four official files in ./data/fashion-mnist or point --data-dir / FASHION_MNIST_DIR at "
                   "them, install Debian's package dataset-fashion-mnist, or connect to the internet")


@dataclass(frozen=True)
class IdxFile:
    name: str            # file name without ".gz"
    magic: int           # 2051 for images, 2049 for labels
    shape: tuple         # expected dimensions
    gz_md5: str          # MD5 of the .gz as published by Zalando (checks downloads)
    sha256: str          # SHA-256 of the decompressed bytes (checks any copy: Debian re-gzips the files,
                         # so its .gz bytes differ from the published MD5 while the content is the same)


# The only files accepted: their dimensions bound what a file may make us read (see read_idx).
FILES = {
    "train_images": IdxFile("train-images-idx3-ubyte", 2051, (60000, 28, 28), "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train_labels": IdxFile("train-labels-idx1-ubyte", 2049, (60000,), "25c81989df183df01b3e8a0aad5dffbe",
                            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test_images": IdxFile("t10k-images-idx3-ubyte", 2051, (10000, 28, 28), "bef4ecab320f06d8554ea6380940ec79",
                           "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test_labels": IdxFile("t10k-labels-idx1-ubyte", 2049, (10000,), "bb300cfdad3c16e7a12a480ee83cd310",
                           "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}


class DataError(cli.UserError):
    """A data problem the user can fix; its message is one line that says what is wrong (exit 1)."""


# ----------------------------------------------------------------------------------------- IDX parsing

def read_idx_file(path: Path | str, spec: IdxFile, data: bytes | None = None) -> np.ndarray:
    """The array of `spec.shape` in a plain or gzipped IDX file (or its bytes `data`, already in memory: a
    download) whose content must match the official SHA-256. The header (magic number and dimensions) is
    checked before any of the body is read, and the body is read no further than the size the header declares
    plus one byte (to see trailing data): a file that would unpack to gigabytes (a gzip bomb) costs no more
    time or memory than the real file."""
    try:
        with open(path, "rb") if data is None else io.BytesIO(data) as f:
            gzipped = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            stream = gzip.GzipFile(fileobj=f) if gzipped else f
            header = stream.read(4 + 4 * len(spec.shape))  # the magic number, then one 4-byte size per dimension
            magic = int.from_bytes(header[:4], "big")
            if magic != spec.magic:
                raise DataError(f"{path}: wrong magic number {magic}, expected {spec.magic}")
            if len(header) < 4 + 4 * len(spec.shape):
                raise DataError(f"{path}: truncated IDX header")
            dims = tuple(int.from_bytes(header[i:i + 4], "big") for i in range(4, len(header), 4))
            if dims != spec.shape:
                raise DataError(f"{path}: dimensions {dims}, expected {spec.shape}")
            size = int(np.prod(dims))
            body = stream.read(size + 1)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; zlib.error: damaged deflate data
        raise DataError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    if len(body) != size:
        raise DataError(f"{path}: {'truncated' if len(body) < size else 'trailing data'} (its header declares "
                        f"{len(header) + size} bytes)")
    if hashlib.sha256(header + body).hexdigest() != spec.sha256:
        raise DataError(f"{path}: checksum mismatch; the file is corrupt or not the official "
                        f"Fashion-MNIST {spec.name} (delete it to re-fetch)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


# ----------------------------------------------------------------------------------------- locating

def _file_in(folder: Path, spec: IdxFile) -> Path | None:
    return next((folder / n for n in (spec.name + ".gz", spec.name) if (folder / n).is_file()), None)


def _download(spec: IdxFile, folder: Path) -> None:
    """Fetch one file, check its published MD5 and its content, and only then write it (atomically)."""
    errors = []
    for url in (base + spec.name + ".gz" for base in DOWNLOAD_URLS):
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                data = response.read()
            if (gz_md5 := hashlib.md5(data).hexdigest()) != spec.gz_md5:
                raise DataError(f"MD5 {gz_md5} differs from the published {spec.gz_md5}")
            read_idx_file(spec.name + ".gz", spec, data)  # the name only names it in an error
            cli.atomic_write(folder / (spec.name + ".gz"), data)
            return
        except (OSError, DataError) as e:
            errors.append(f"{url}: {e}")
    raise DataError(f"Fashion-MNIST not found and could not download {spec.name}.gz ({'; '.join(errors)}); "
                    f"{WHERE_TO_GET_IT}")


def find_data_dir(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """A folder holding all four files (searched in the order of the module docstring), downloading them if
    allowed and needed. An explicit folder is the only one tried: never fall back silently to other data."""
    explicit = data_dir or os.environ.get("FASHION_MNIST_DIR")
    for folder in [Path(explicit)] if explicit else [DEFAULT_DATA_DIR, SYSTEM_DATA_DIR]:
        if all(_file_in(folder, spec) for spec in FILES.values()):
            return folder
    if explicit:
        raise DataError(f"{explicit}: the four Fashion-MNIST files are not all there")
    if not download:
        raise DataError(f"Fashion-MNIST not found; {WHERE_TO_GET_IT}")
    for spec in FILES.values():
        if not _file_in(DEFAULT_DATA_DIR, spec):
            _download(spec, DEFAULT_DATA_DIR)
    return DEFAULT_DATA_DIR


def load_raw(data_dir: str | os.PathLike | None = None, download: bool = True) -> dict[str, np.ndarray]:
    """The four official arrays (uint8 images (N, 28, 28), int64 labels (N,)), checked."""
    folder = find_data_dir(data_dir, download)
    arrays = {key: read_idx_file(_file_in(folder, spec), spec) for key, spec in FILES.items()}
    for key in ("train_labels", "test_labels"):  # classes 0-9, balanced (a label outside is an 11th count)
        arrays[key] = labels = arrays[key].astype(np.int64)
        counts = np.bincount(labels, minlength=NUM_CLASSES).tolist()
        if counts != [len(labels) // NUM_CLASSES] * NUM_CLASSES:
            raise DataError(f"{key}: per-class counts {counts}, expected {len(labels) // NUM_CLASSES} of each class")
    return arrays


# ----------------------------------------------------------------------------------------- splitting

def stratified_split(y: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split indices of `y` into len(fractions) disjoint parts with the same class mix in each.

    Per class, part sizes are rounded down and the remainder goes to the last part, so a balanced
    dataset splits exactly (e.g. 70,000 -> 56,000 / 7,000 / 7,000 for 0.8 / 0.1 / 0.1).
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        sizes = [int(len(idx) * f) for f in fractions[:-1]]
        for i, chunk in enumerate(np.split(idx, np.cumsum(sizes))):
            parts[i].append(chunk)
    return [rng.permutation(np.concatenate(p)) for p in parts]


def scale(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, 28, 28) -> flattened float32 (N, 784) in [0, 1] (Q1 normalisation, Q2a)."""
    return images.reshape(len(images), INPUT_DIM).astype(np.float32) / np.float32(255.0)


def to_images(X: np.ndarray) -> np.ndarray:
    """Flattened (N, 784) -> (N, 1, 28, 28) for the CNN; a view, no copy."""
    return X.reshape(len(X), 1, IMAGE_SIDE, IMAGE_SIDE)


def standardization_stats(X_train: np.ndarray) -> tuple[float, float]:
    """Global pixel mean and std of the training split (never val or test, so nothing leaks)."""
    return float(X_train.mean(dtype=np.float64)), float(X_train.std(dtype=np.float64))


@dataclass(frozen=True)
class Splits:
    X_train: np.ndarray  # (N, 784) float32 in [0, 1]
    y_train: np.ndarray  # (N,) int64
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    def subset(self, n_train: int | None, n_eval: int | None = None, seed: int = 0) -> "Splits":
        """Stratified, seeded subsets: `n_train` training images, `n_eval` each of val and test (as close to
        class-balanced in proportion as rounding allows)."""
        def take(X, y, n):
            if n is None or n >= len(y):
                return X, y
            idx = np.sort(stratified_split(y, (n / len(y), 1 - n / len(y)), seed)[0])
            return X[idx], y[idx]
        return Splits(*take(self.X_train, self.y_train, n_train), *take(self.X_val, self.y_val, n_eval),
                      *take(self.X_test, self.y_test, n_eval))


def load_splits(data_dir=None, split: str = "official", seed: int = 0, val_size: int = 6000, download=True) -> Splits:
    """Scaled, flattened, disjoint splits; the same for the same seed.

    split="official": the official 10,000 test images are the test set (results compare with published
    ones) and a stratified `val_size` validation set is carved from the 60,000 training images.
    split="pooled": an exact stratified 80/10/10 split of all 70,000 images.
    """
    raw = load_raw(data_dir, download)
    X, y = scale(raw["train_images"]), raw["train_labels"]
    X_test, y_test = scale(raw["test_images"]), raw["test_labels"]
    if split == "official":
        train, val = stratified_split(y, (1 - val_size / len(y), val_size / len(y)), seed)
        return Splits(X[train], y[train], X[val], y[val], X_test, y_test)
    X, y = np.concatenate([X, X_test]), np.concatenate([y, y_test])
    train, val, test = stratified_split(y, (0.8, 0.1, 0.1), seed)
    return Splits(X[train], y[train], X[val], y[val], X[test], y[test])


# ----------------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description="Get, verify and summarise Fashion-MNIST.")
    p.add_argument("--data-dir", type=cli.path_arg, help="folder with the four IDX files (default: $FASHION_MNIST_DIR, "
                   "./data/fashion-mnist, /usr/share/datasets/fashion-mnist, else download)")
    p.add_argument("--split", choices=("official", "pooled"), default="official",
                   help="official: 54k/6k/official 10k test; pooled: 80/10/10 of all 70k (default: official)")
    p.add_argument("--seed", type=cli.seed_arg, default=0, help="seed of the validation split (default: 0)")
    p.add_argument("--no-download", action="store_true", help="never download; fail if not found")
    args = p.parse_args(argv)
    folder = find_data_dir(args.data_dir, download=not args.no_download)
    splits = load_splits(folder, args.split, args.seed)
    print(f"Fashion-MNIST from {folder} (checksums verified)")
    print(f"{'split':<6} {'images':>7}  per class  pixel mean  pixel std")
    for name in ("train", "val", "test"):
        X, y = getattr(splits, f"X_{name}"), getattr(splits, f"y_{name}")
        counts = " ".join(f"{c:>4}" for c in np.bincount(y, minlength=NUM_CLASSES))
        print(f"{name:<6} {len(y):>7}  {counts}  {X.mean():10.4f} {X.std():10.4f}")
    print("classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(CLASS_NAMES)))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, "preprocessing.py"))
