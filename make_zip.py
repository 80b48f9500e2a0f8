"""Build the submission zip, named after the group (report/group.toml's group_name).

    python make_zip.py                 # -> <group_name>.zip in the repository root

It holds exactly: the code (*.py at the root, report/'s sources, tests/, benchmarks/), README.md,
requirements*.txt, Makefile, .ci/run, report/report.pdf and every results file the report cites or is
built from at the top of results/ (*.csv, *.json: summary, manifest, gradcheck; *.jsonl: the recipe sweep).
Never the data, a virtual environment, caches, run records, saved models or figures (the PDF has them).
"""
from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_DIR))

from preprocessing import ArgumentParser, path_arg  # noqa: E402
from report.build import GROUP_FILE, ReportError, load_group  # noqa: E402

REPORT_SOURCES = ("report/*.py", "report/report.typ", "report/group.toml", "report/references.bib")
CODE_TREES = ("tests", "benchmarks")  # every file below them except caches
SKIP_PARTS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


class ZipError(Exception):
    """One-line reason why the zip cannot be built."""


def submission_files(repo: Path = REPO_DIR) -> list[str]:
    """Paths (relative, POSIX) that go into the zip; raises ZipError when a required one is missing."""
    pdf = repo / "report" / "report.pdf"
    if not pdf.is_file():
        raise ZipError("report/report.pdf is missing: build it first with `make report` "
                       "(or `python -m report.build`)")
    summary = repo / "results" / "summary.json"
    if not summary.is_file():
        raise ZipError("results/summary.json is missing: run the study first (`make study`)")
    files = set()
    for pattern in ("*.py", "requirements*.txt", "README.md", "Makefile", ".ci/run", *REPORT_SOURCES,
                    "results/*.csv", "results/*.json", "results/*.jsonl", "report/report.pdf"):
        files.update(p for p in repo.glob(pattern) if p.is_file())
    for tree in CODE_TREES:
        for p in (repo / tree).rglob("*"):
            rel = p.relative_to(repo)
            if p.is_file() and not SKIP_PARTS.intersection(rel.parts) and p.suffix not in SKIP_SUFFIXES:
                files.add(p)
    for required in ("README.md", "Makefile", "requirements.txt"):
        if not (repo / required).is_file():
            raise ZipError(f"{required} is missing from {repo}")
    if summary.stat().st_mtime > pdf.stat().st_mtime:
        print("warning: results/summary.json is newer than report/report.pdf: rebuild it with `make report`",
              file=sys.stderr)
    return sorted(p.relative_to(repo).as_posix() for p in files)


def make_zip(repo: Path = REPO_DIR, group_file: Path | None = None, out_dir: Path | None = None) -> Path:
    group = load_group(group_file or repo / "report" / "group.toml")
    if group["placeholder"]:
        print(f"warning: {group_file or 'report/group.toml'} is not filled in: the zip is named "
              f"{group['zip_name']}.zip and the report shows placeholders", file=sys.stderr)
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in group["zip_name"]).strip("-.") or "group-name"
    out = (out_dir or repo) / f"{name}.zip"
    files = submission_files(repo)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # Files sit under a top folder named after the group, so unzipping never spills into the cwd.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for rel in files:
                zf.write(repo / rel, f"{name}/{rel}")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def main(argv=None) -> int:
    p = ArgumentParser(description="Build <group_name>.zip for submission.")
    p.add_argument("--group-file", type=path_arg, default=str(GROUP_FILE),
                   help="group details (default: report/group.toml)")
    p.add_argument("--out-dir", type=path_arg, default=str(REPO_DIR),
                   help="where to write the zip (default: the repository root)")
    args = p.parse_args(argv)
    try:
        out = make_zip(REPO_DIR, Path(args.group_file), Path(args.out_dir))
    except (ZipError, ReportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(out) as zf:
        n = len(zf.namelist())
    print(f"wrote {out} ({n} files, {out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
