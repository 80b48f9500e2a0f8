"""What every script shares at its edge: the command line's checks, atomic writes, and one way of turning a
user's or the machine's error into one line and an exit code.

    if __name__ == "__main__":
        sys.exit(cli.run(main, "mlp_scratch.py"))

Exit codes: 0 done; 1 bad data, a damaged or unwritable file, out of memory, a full disk; 2 a usage error;
3 a training run that diverged; 130 Ctrl-C. `run` turns a closed list of errors into one line on stderr:
UserError (raised by our code with the line to print), KeyboardInterrupt, out of memory (numpy's
MemoryError, torch's OutOfMemoryError and its CPU allocator's RuntimeError) and the OSErrors of a file
system (full, read-only, no permission, no such file). Any other exception is a bug and keeps its traceback.
Numpy only: the MLP's side of the project imports no torch.
"""
import argparse
import contextlib
import dataclasses
import errno
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

EXIT_ERROR, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 1, 2, 3, 130
MAX_SEED = 2**31 - 1  # every seed of the project: torch.manual_seed and numpy take it, 2**31-1 keeps it portable
FILE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
               errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EIO}
OUT_OF_MEMORY_TEXTS = ("out of memory", "can't allocate memory")  # torch's RuntimeErrors that are out of memory


class UserError(Exception):
    """An error the user can fix: its message is the whole line printed, and `exit_code` the exit status."""
    exit_code = EXIT_ERROR


class Diverged(UserError):
    exit_code = EXIT_DIVERGED


def run(main, prog: str, argv: list[str] | None = None, *, oom_hint: str = "",
        on_interrupt: str = "nothing was saved") -> int:
    """main(argv)'s exit code, with the closed list of user and environment errors printed as one line."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted (Ctrl-C); {on_interrupt}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UserError as e:
        line, code = str(e), e.exit_code
    except OSError as e:
        if e.errno not in FILE_ERRNOS:
            raise
        line, code = f"{e.filename}: {e.strerror}" if e.filename else f"{e.strerror}", EXIT_ERROR
    except (MemoryError, RuntimeError) as e:
        # numpy's MemoryError; torch's OutOfMemoryError ("CUDA out of memory"), a RuntimeError, and its CPU
        # allocator's plain RuntimeError ("DefaultCPUAllocator: can't allocate memory: you tried to allocate ...")
        if isinstance(e, RuntimeError) and not any(s in str(e).lower() for s in OUT_OF_MEMORY_TEXTS):
            raise
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        line, code = f"out of memory ({first_line}){oom_hint}", EXIT_ERROR
    print(f"{prog}: error: {line}", file=sys.stderr)
    return code


# ------------------------------------------------------------------------------------------- command line
class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line, `prog: error: <what> (see --help)`, exit status 2,
    not the whole usage block. Every script's command line uses it."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def path_arg(text: str) -> str:
    """argparse type of every path flag: an empty path (a variable that expanded to nothing) would silently
    mean the current folder or no path at all, so it is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def seed_arg(text: str) -> int:
    """argparse type of every seed flag: an integer in [0, MAX_SEED]."""
    with contextlib.suppress(ValueError):  # not an integer at all
        if 0 <= (seed := int(text)) <= MAX_SEED:
            return seed
    raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {text!r}")


def seed_list_arg(text: str) -> tuple[int, ...]:
    """argparse type of a flag of distinct seeds, comma-separated: "0,1,2"."""
    seeds = tuple(seed_arg(s) for s in text.split(","))
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got {text!r}")
    return seeds


def count_arg(what: str, most: int):
    """An argparse type: a whole number of `what` in 1..most."""
    def parse(text: str) -> int:
        n = int(text) if text.isdigit() else 0
        if not 1 <= n <= most:
            raise argparse.ArgumentTypeError(f"expected a whole number of {what} in 1..{most}, got {text!r}")
        return n
    return parse


def cannot_write(path: str | Path, *, folder: bool) -> str | None:
    """Why `path` (a folder, or a file) cannot be written, or None if it can: checked before training, so
    that a typo costs a second and not a run. Missing folders are made, as the write would make them."""
    path = Path(path)
    if not folder and path.is_dir():
        return f"{path} is a folder, not a file"
    target = path if folder else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=target).close()  # a probe: can a file be made there?
    except (FileExistsError, NotADirectoryError):  # a file stands where a folder must be
        blocker = next((p for p in (target, *target.parents) if p.exists() and not p.is_dir()), target)
        return f"{blocker} is {'a file' if blocker.exists() else 'a broken link'}, not a folder"
    except OSError as e:
        return f"cannot write in {target}: {e.strerror or e}"
    return None


# ------------------------------------------------------------------------------------- config fields as flags
def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def integer(lo: int, hi: int):
    """A field's rule: (test, what a valid value is)."""
    return (lambda v: is_int(v) and lo <= v <= hi), f"an integer in [{lo}, {hi}]"


def number(test, text: str):
    """A field's rule: a finite real number (not a bool) that passes `test`, described by `text`."""
    return (lambda v: (is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(v) and test(v)), \
        f"a finite number {text}"


# Rules several configs share (MLPConfig, CNNConfig): one statement each.
BOOL = (lambda v: isinstance(v, (bool, np.bool_)), "true or false")
POSITIVE = number(lambda v: v > 0, "> 0")  # a learning rate
NON_NEGATIVE = number(lambda v: v >= 0, ">= 0")
BELOW_ONE = number(lambda v: 0 <= v < 1, "in [0, 1)")  # a drop probability, a momentum
SEED = integer(0, MAX_SEED)


def flag(default, help: str, valid=None, **argparse_options):
    """A config field and its command-line flag in one place: the default, the flag's help, what a valid value
    is ((test, description); `choices` imply it) and any argparse options the default's type does not."""
    if valid is None:
        choices = argparse_options["choices"]
        valid = (lambda v: v in choices), "one of " + ", ".join(map(str, choices))
    default_of = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return dataclasses.field(**default_of, metadata={"help": help, "valid": valid, "argparse": argparse_options})


def check_fields(config):
    """Returns config, or raises ValueError("<field>: <what is wrong>") on the first field its rule refuses."""
    for f in dataclasses.fields(config):
        test, must_be = f.metadata["valid"]
        if not test(getattr(config, f.name)):
            raise ValueError(f"{f.name}: must be {must_be}, got {getattr(config, f.name)!r}")
    return config


def add_config_flags(parser: argparse.ArgumentParser, config_class) -> None:
    """One flag per field of config_class (made with `flag`): its default, help and type."""
    for f, default in ((f, getattr(config_class(), f.name)) for f in dataclasses.fields(config_class)):
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(default, bool) else {"type": type(default)}
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, help=f.metadata["help"],
                            **{**kind, **f.metadata["argparse"]})


def config_from_args(parser: argparse.ArgumentParser, config_class, args: argparse.Namespace):
    """The validated config the flags describe; an invalid value is a usage error naming its flag."""
    config = config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})
    try:
        return config.validate()
    except ValueError as e:
        name, _, why = str(e).partition(": ")
        parser.error(f"--{name.replace('_', '-')}: {why}")


# ------------------------------------------------------------------------------------------- atomic writes
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, outputs get the usual 0666 & ~umask
TMP_SUFFIX = ".tmp"


def atomic_write(path, data: str | bytes) -> None:
    """Write `data` to `path` through a unique temporary file in the same folder, fsync, os.replace.
    Readers see the old file or the new one, never half of one. On any failure (a full disk: OSError
    ENOSPC) the temporary file is removed, the original is untouched, and the error is re-raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)
            view = memoryview(data.encode("utf-8") if isinstance(data, str) else data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_folder(path, files: dict[str, bytes]) -> Path:
    """Write the folder `path` holding `files` (name -> bytes) all at once: built as a hidden sibling, then
    renamed into place, so a reader finds the old folder or the whole new one, never part of one. A failure
    (a full disk) removes the partial copy and leaves the old folder as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    old = path.with_name(f".{path.name}.old{TMP_SUFFIX}")  # the folder being replaced, until the new one is in
    shutil.rmtree(old, ignore_errors=True)  # a leftover of an interrupted write
    try:
        for name, data in files.items():
            atomic_write(tmp / name, data)
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path
