"""Build the submission zip, named after the group (report/group.toml's group_name).

    python make_zip.py                 # -> <group_name>.zip in the repository root

It holds: the code (*.py at the root, report/'s sources, tests/, benchmarks/), README.md, requirements*.txt,
Makefile, pytest.ini, .ci/run, report/report.pdf and all of results/ (tables, summary, manifest, run records,
figures with their json data, the saved models), so that the figures and the report can be rebuilt from the
unpacked zip without training (`python -m report.build` there; tests/test_report.py checks it), and the kept
models (results/models/*_best) can be checked without retraining. Never the data, a virtual environment,
caches, hidden or temporary files (a lock, a half-written `.tmp`) or damaged run records set aside as `*.bad`.

report/group.toml, the group's name, members and contributions, is read here (load_group) for the zip's name
and by report/build.py for the title page.
"""
import io
import sys
import tomllib
import zipfile
from pathlib import Path

import cli

REPO_DIR = Path(__file__).resolve().parent
GROUP_FILE = REPO_DIR / "report" / "group.toml"  # the group's name, members and contributions
FILES = ("*.py", "requirements*.txt", "README.md", "Makefile", "pytest.ini", ".ci/run", "report/*.py",
         "report/report.typ", "report/group.toml", "report/references.bib", "report/report.pdf")
TREES = ("tests", "benchmarks", "results")  # every file below them but those skipped
REQUIRED = {"report/report.pdf": "build it first with `make report` (or `python -m report.build`)",
            "results/summary.json": "run the study first (`make study`)",
            "README.md": "", "Makefile": "", "requirements.txt": ""}


def load_group(path=GROUP_FILE) -> dict:
    """Group name, members, contributions. A template (empty fields) gives placeholders; anything invalid
    (TOML syntax, wrong types, nan or negative contributions, a sum other than 100) raises cli.UserError."""
    def bad(msg):
        return cli.UserError(f"{path}: {msg} (see the comments in report/group.toml)")
    if not Path(path).is_file():  # a mistyped --group-file would otherwise give a report of placeholders
        raise bad("no such file")
    try:
        data = tomllib.loads(Path(path).read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"not valid TOML ({exc})") from None
    gname, members = data.get("group_name", ""), data.get("member", [])
    if not (isinstance(gname, str) and isinstance(members, list) and all(
            isinstance(m, dict) and all(isinstance(m.get(k, ""), str) for k in ("name", "email")) for m in members)):
        raise bad("group_name must be a string, and each [[member]] a name and email that are strings")
    given = [m.get("contribution") for m in members]
    if wrong := [c for c in given if c is not None and not cli.NON_NEGATIVE[0](c)]:  # [0]: the rule's test
        raise bad(f"a contribution must be a number, a finite percentage >= 0, got {wrong[0]!r}")
    if any(c is not None for c in given) and (None in given or abs(sum(given) - 100) > 1e-6):
        raise bad("every member needs a contribution once one is given" if None in given else
                  f"contributions add up to {sum(given):g}%, not 100%")
    shown = [{"name": m.get("name", "").strip() or f"[Member {i} name]", "email": m.get("email", "").strip()
              or f"[member{i} email]", "contribution": "[contribution %]" if c is None else f"{c:g}%"}
             for i, (m, c) in enumerate(zip(members or [{}], given or [None]), 1)]
    filled = gname.strip() and members and None not in given and all(m["name"][:1] != "[" and m["email"][:1] != "["
                                                                      for m in shown)
    return {"name": gname.strip() or "[Group name]", "zip_name": gname.strip() or "group-name", "members": shown,
            "placeholder": not filled}


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
    group = load_group(group_file or repo / "report" / "group.toml")
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
    a, path = p.add_argument, cli.path_arg
    a("--group-file", type=path, default=str(GROUP_FILE), help="group details (default: report/group.toml)")
    a("--out-dir", type=path, default=str(REPO_DIR), help="where to write the zip (default: the repository root)")
    args = p.parse_args(argv)
    make_zip(REPO_DIR, Path(args.group_file), Path(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, "make_zip.py", on_interrupt="no zip was written"))
