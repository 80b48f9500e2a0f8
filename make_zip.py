"""Build the submission zip, named after the group (report/group.toml's group_name).

    python make_zip.py                 # -> <group_name>.zip in the repository root

It holds: the code (*.py at the root, report/'s sources, tests/, benchmarks/), README.md, requirements*.txt,
Makefile, pytest.ini, .ci/run, report/report.pdf and all of results/ (tables, summary, manifest, run records,
figures with their json data, the saved models), so that the figures and the report can be rebuilt from the
unpacked zip without training. Never the data, a virtual environment, caches, hidden or temporary files
(a lock, a half-written `.tmp`) or damaged run records set aside as `*.bad`.
"""
import io
import sys
import zipfile
from pathlib import Path

import cli
from report.build import GROUP_FILE, load_group

REPO_DIR = Path(__file__).resolve().parent
FILES = ("*.py", "requirements*.txt", "README.md", "Makefile", "pytest.ini", ".ci/run", "report/*.py",
         "report/report.typ", "report/group.toml", "report/references.bib", "report/report.pdf")
TREES = ("tests", "benchmarks", "results")  # every file below them but those skipped
REQUIRED = {"report/report.pdf": "build it first with `make report` (or `python -m report.build`)",
            "results/summary.json": "run the study first (`make study`)",
            "README.md": "", "Makefile": "", "requirements.txt": ""}


def skipped(rel: Path) -> bool:
    return any(p.startswith(".") or p == "__pycache__" for p in rel.parts) or rel.suffix in {".pyc", ".bad"}


def submission_files(repo: Path = REPO_DIR) -> list[str]:
    """Paths (relative, POSIX) that go into the zip; raises cli.UserError when a required one is missing."""
    for rel, hint in REQUIRED.items():
        if not (repo / rel).is_file():
            raise cli.UserError(f"{rel} is missing from {repo}" + (f": {hint}" if hint else ""))
    files = {p for pattern in FILES for p in repo.glob(pattern)}
    files |= {p for tree in TREES for p in (repo / tree).rglob("*") if not skipped(p.relative_to(repo))}
    if (repo / "results/summary.json").stat().st_mtime > (repo / "report/report.pdf").stat().st_mtime:
        print("warning: results/summary.json is newer than report/report.pdf: rebuild it with `make report`",
              file=sys.stderr)
    return sorted(p.relative_to(repo).as_posix() for p in files if p.is_file())


def make_zip(repo: Path = REPO_DIR, group_file: Path | None = None, out_dir: Path | None = None) -> Path:
    """Write <out_dir>/<group_name>.zip (atomically) and say so; returns its path."""
    group = load_group(group_file or repo / "report" / "group.toml")  # ReportError is a cli.UserError
    if group["placeholder"]:
        print(f"warning: {group_file or 'report/group.toml'} is not filled in: the zip is named "
              f"{group['zip_name']}.zip and the report shows placeholders", file=sys.stderr)
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in group["zip_name"]).strip("-.") or "group-name"
    files = submission_files(repo)
    buf = io.BytesIO()
    # Files sit under a top folder named after the group, so unzipping never spills into the cwd.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel in files:
            zf.write(repo / rel, f"{name}/{rel}")
    out = (out_dir or repo) / f"{name}.zip"
    cli.atomic_write(out, buf.getbuffer())  # never a half-written zip under the final name
    print(f"wrote {out} ({len(files)} files, {buf.getbuffer().nbytes / 1e6:.1f} MB)")
    return out


def main(argv=None) -> int:
    p = cli.ArgumentParser(description="Build <group_name>.zip for submission.")
    p.add_argument("--group-file", type=cli.path_arg, default=str(GROUP_FILE),
                   help="group details (default: report/group.toml)")
    p.add_argument("--out-dir", type=cli.path_arg, default=str(REPO_DIR),
                   help="where to write the zip (default: the repository root)")
    args = p.parse_args(argv)
    make_zip(REPO_DIR, Path(args.group_file), Path(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, "make_zip.py", on_interrupt="no zip was written"))
