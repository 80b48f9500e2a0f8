"""The report builds from results, prints only named facts, refuses a claim the results contradict (naming the
sentence), gives the same bytes twice, and rebuilds from the submission zip.

The results here are SYNTHETIC but laid out by the study's own code: run_experiments.Study runs the full
plan's stages with an engine that trains nothing (each run's accuracy is drawn from its key), and
study_results.rebuild_outputs writes the summary and tables, so the schema is the study's. A few seconds."""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cli
import run_experiments as rx
import study_results
from report import build

REPO = Path(__file__).resolve().parents[1]
N_TEST = 500
SECTIONS = ("Data and preprocessing", "The MLP from scratch", "The CNN and its training recipe",
            "How the study chose", "MLP study (Q2f)", "CNN study (Q3a–d)", "Confirmation at full budget",
            "Final models", "What the models learned", "Limitations", "Conclusion", "How to run")
TEMPLATE = 'group_name = ""\n[[member]]\nname = ""\nemail = ""\n'
FILLED = '''group_name = "team-7"
[[member]]
name = "Ada Lovelace"
email = "ada@example.org"
contribution = 60
[[member]]
name = "Alan Turing"
email = "alan@example.org"
contribution = 40
'''


# ------------------------------------------------------------------------------------------ synthetic study
def _fake_run(spec: rx.RunSpec) -> tuple[dict, dict]:
    """A run record as run_on_worker writes it, with an accuracy drawn from the run's key (so a level's seeds
    differ and the same config always scores the same)."""
    rng = np.random.default_rng(int(spec.key[:8], 16))
    val = float(np.clip((0.88 if spec.model == "mlp" else 0.92) + rng.normal(0, 0.004), 0, 1))
    if spec.model == "mlp" and not spec.config["hidden"]:
        val -= 0.05  # no hidden layer must not win: the width stage has no width to vary then
    epochs = spec.config["epochs"]
    hist = [{"epoch": e, "phase": "backbone" if spec.model == "cnn" else None, "lr": 1e-3,
             "train_loss": 1 / e, "train_acc": val + 0.03 - 0.1 / e, "val_loss": 0.3 + 0.01 * abs(e - 3),
             "val_acc": val - 0.05 / e, "seconds": 1.0} for e in range(1, epochs + 1)]
    rec = {"key": spec.key, "model": spec.model, "study": spec.study, "variant": spec.variant, "seed": spec.seed,
           "role": spec.role, "plan": spec.plan, "config": spec.config, "budget": dataclasses.asdict(spec.budget),
           "n_train": 54000, "n_val": 6000, "epochs_run": epochs, "best_epoch": epochs, "train_loss": 0.2,
           "train_acc": val + 0.03, "val_loss": 0.3, "val_acc": val, "seconds": 10.0 + rng.random(),
           "sec_per_epoch": 1.0, "threads": 1, "device": "cpu", "diverged": False, "history": hist,
           "n_params": 1000, "macs": rx.mlp_macs(spec.config) if spec.model == "mlp" else rx.cnn_macs(spec.config)}
    if spec.model == "cnn":
        frozen = spec.config["head_mode"] == "frozen"
        rec.update(feature_dim=spec.config.get("head_hidden", [1])[0] + 100, precision="fp32",
                   linear_val_acc=val - 0.002 if frozen else None, backbone_seconds=8.0 if frozen else None)
    files = {}
    if spec.role == "final":
        y = np.arange(N_TEST) % 10
        pred = np.where(rng.random(N_TEST) < val, y, (y + 1) % 10)
        prob = np.where(pred == y, rng.uniform(0.6, 1, N_TEST), rng.uniform(0.3, 1, N_TEST))
        files = {f"models/runs/{spec.model}_{spec.key}.npz": b"model"}
        rec.update(n_test=N_TEST, test_loss=0.3, test_acc=float((pred == y).mean()), test_true=y.tolist(),
                   test_pred=pred.tolist(), test_prob_max=prob.round(5).tolist(), model_file=next(iter(files)),
                   **study_results.classification_report(y, pred))
    return rec, files


class FakeEngine:
    """Study's engine: `run(specs)` gives every spec's record, 'training' those not yet in the registry."""
    device, threads = "cpu", 1

    def __init__(self, registry):
        self.registry, self.lock = registry, threading.Lock()

    def start(self, specs):  # nothing to submit: run() answers at once
        return []

    def run(self, specs):
        with self.lock:
            for s in specs:
                if s.key not in self.registry:
                    self.registry.add(*_fake_run(s))
            return [self.registry.records[s.key] for s in specs]


def write_results(d: Path) -> Path:
    """A results folder with the full study's stages and finals (plan named 'quick': the real report's claims
    are about the real results, so here they warn instead of stopping the build)."""
    plan = dataclasses.replace(rx.FULL_PLAN, name="quick")
    study = rx.Study(FakeEngine(study_results.Registry(d, log=lambda *a: None)), plan)
    study.run()
    rx.write_manifest(d, study.manifest(), study.tracks)
    rows = [{"model": "cnn", "scheme": s, "batchnorm": bn, "layer": layer, "act_mean": 0.1,
             "act_std": (1.0 if bn else {"random": 1e-4, "xavier": 0.1, "he": 1.0}[s]) / layer, "dead_frac": 0.1,
             "grad_norm": {"random": 40.0, "xavier": 2.0, "he": 1.0}[s]} for s in ("random", "xavier", "he")
            for bn in (True, False) for layer in range(1, 6)]
    pd.DataFrame(rows, columns=rx.INIT_STATS_COLUMNS).to_csv(d / "init_stats.csv", index=False)
    study_results.rebuild_outputs(d, log=lambda *a: None)
    for name in ("cnn_recipe_sweep_cpu.jsonl", "cnn_default_timing.jsonl", "grid_budget.json"):  # benchmarks' rows
        shutil.copy(REPO / "results" / name, d)
    return d


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return write_results(tmp_path_factory.mktemp("results"))


def _group(d: Path, body: str) -> Path:
    (d / "group.toml").write_text(body)
    return d / "group.toml"


@pytest.fixture(scope="module")
def built(results, tmp_path_factory):
    """The PDF and its facts.json, built from the synthetic results with a template group file."""
    tmp = tmp_path_factory.mktemp("built")
    out = build.build_report(results, tmp / "report.pdf", _group(tmp, TEMPLATE), tmp / "facts.json")
    return out, json.loads((tmp / "facts.json").read_text())


def _copy(results: Path, tmp_path: Path) -> Path:
    d = tmp_path / "results"
    shutil.copytree(results, d)
    return d


# ------------------------------------------------------------------------------------------ the PDF
def outline(pdf: bytes) -> list[str]:
    """The PDF's bookmarks (one per heading): literal strings (balanced parentheses stay unescaped), or
    UTF-16 hex where a title is not ASCII."""
    return [bytes.fromhex(hexed.decode()).decode("utf-16") if hexed else re.sub(rb"\\(.)", rb"\1", lit).decode()
            for lit, hexed in re.findall(rb"/Title ?(?:\(((?:\\.|[^\\()]|\((?:\\.|[^\\()])*\))*)\)|<([0-9A-Fa-f]+)>)", pdf)]


def test_the_pdf_has_every_section_in_order_and_fits_the_page_limits(built):
    pdf, facts = built
    numbered = dict(t.split(" ", 1)[::-1] for t in outline(pdf.read_bytes()) if t[:1].isdigit())
    assert [s for s in SECTIONS if s not in numbered] == [], numbered
    assert [int(numbered[s]) for s in SECTIONS] == sorted(int(numbered[s]) for s in SECTIONS)
    assert facts["pages"]["body"] <= build.MAX_BODY_PAGES and facts["pages"]["total"] <= build.MAX_PAGES


def test_two_builds_give_the_same_bytes(results, built, tmp_path):
    again = build.build_report(results, tmp_path / "again.pdf", _group(tmp_path, TEMPLATE))
    assert again.read_bytes() == built[0].read_bytes()


def test_the_report_names_only_facts_the_study_produces_and_every_stage_has_a_claim(built):
    """Every fact the real report.typ prints or claims about exists for a full study's layout (whatever won);
    every stage and comparison has a checked claim."""
    _pdf, facts = built
    source = build.TYP_SOURCE.read_text()
    problems = build.check_claims(facts, source, strict=False)
    assert not [p for p in problems if "do not have" in p], problems
    claims = build.read_claims(source)
    for stage in [s for s in rx.STAGE] + ["heads", "mlp.chain_minus_start", "cnn.chain_minus_start", "cnn.ece",
                                          "budget."]:
        assert any(stage in c["expr"] for c in claims), stage
    assert not re.search(r"\d\.\d\d%", re.sub(r"//.*", "", source)), "a number typed by hand"


def test_numbers_are_the_results(built, results):
    _pdf, facts = built
    s = json.loads((results / "summary.json").read_text())
    assert facts["v"]["mlp.test_acc"] == f"{100 * s['mlp']['test_acc']:.2f}%"
    assert facts["n"]["cnn.wilson_lo"] == s["cnn"]["test_acc_wilson95"][0]
    assert facts["n"]["mlp_lr.winner_id"] == s["stages"]["mlp_lr"]["winner"]
    grad = json.loads((results / "gradcheck.json").read_text())
    assert max(r["fd"] for r in grad["rows"]) < 1e-6 and max(r["torch"] for r in grad["rows"]) < 1e-10


# ------------------------------------------------------------------------------------------ claims
CLAIMS = '''#let F = json("facts.json")
#set document(date: none)
#let v(k) = F.v.at(k)
= Dropout
// claim: mlp_dropout.winner_id == "{winner}" and mlp_dropout.runner.mean <= mlp_dropout.win.mean
Dropout #v("mlp_dropout.winner") won the dropout stage.
#context [#metadata(here().page()) <appendix-page>]
#context [#metadata(counter(page).final().first()) <last-page>]
'''


def test_a_flipped_outcome_stops_the_build_naming_the_sentence(results, tmp_path, capsys):
    d = _copy(results, tmp_path)
    winner = json.loads((d / "manifest.json").read_text())["stages"]["mlp_dropout"]["winner"]
    typ = tmp_path / "claims.typ"
    typ.write_text(CLAIMS.format(winner=winner))
    group = _group(tmp_path, TEMPLATE)
    build.build_report(d, tmp_path / "ok.pdf", group, source=typ, strict=True)  # holds: builds
    for name in ("manifest.json", "summary.json"):  # the stored decision flipped to the runner-up
        doc = json.loads((d / name).read_text())
        st = doc["stages"]["mlp_dropout"]
        st["winner"] = next(v for v in st["levels"] if v != winner)
        (d / name).write_text(json.dumps(doc))
    with pytest.raises(build.ReportError, match=r"report.typ line 5 \(\"Dropout <mlp_dropout.winner> won"):
        build.build_report(d, tmp_path / "no.pdf", group, source=typ, strict=True)
    assert not (tmp_path / "no.pdf").exists()


def test_a_claim_about_a_fact_the_results_lack_or_that_cannot_be_evaluated_is_named():
    facts = {"n": {"a.b": 1, "a.c": None}, "v": {}}
    assert build.check_claim({"line": 3, "expr": "a.b == 1", "sentence": "s"}, facts) is None
    assert "a.zz" in build.check_claim({"line": 3, "expr": "a.zz > 0", "sentence": "s"}, facts)
    assert "cannot be evaluated" in build.check_claim({"line": 3, "expr": "a.c > 0", "sentence": "s"}, facts)
    assert "does not hold" in build.check_claim({"line": 3, "expr": "rising([3, 2])", "sentence": "s"}, facts)


def test_the_levels_get_predictable_fact_names():
    assert [build.slug(v) for v in ("he, no BN", "0.003", "x1 x1 x2 x2 x4", "full recipe")] == \
        ["he_no_bn", "0_003", "x1_x1_x2_x2_x4", "full_recipe"]
    assert build.name("cnn_kernel", "5") == "5×5" and build.name("cnn_init", "he, no BN") == "He without BatchNorm"


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("damage, message", [
    (lambda s: s.update(mlp=None), "summary.json has no mlp"),
    (lambda s: s["cnn"].pop("key"), "do not have the expected shape (KeyError: 'key')"),
    (lambda s: s["cnn"].update(test_acc=1.5), "cnn.test_acc is 1.5, but the run records give"),
    (lambda s: s["mlp"].update(test_acc=0.999), "mlp.test_acc is 0.999, but the run records give"),
])
def test_a_damaged_or_stale_summary_stops_the_report_with_one_line(results, tmp_path, capsys, damage, message):
    d = _copy(results, tmp_path)
    summary = json.loads((d / "summary.json").read_text())
    damage(summary)
    (d / "summary.json").write_text(json.dumps(summary))
    assert build.main(["--results-dir", str(d), "--out", str(tmp_path / "r.pdf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("report.build: error: ") and message in err[-1] and not (tmp_path / "r.pdf").exists()


def test_an_output_path_that_cannot_be_written_is_one_line(results, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert build.main(["--results-dir", str(results), "--out", str(blocker / "x")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"report.build: error: cannot write {blocker / 'x'}")


@pytest.mark.parametrize("body, message", [
    ("group_name = [", "not valid TOML"),
    ('group_name = 7', "group_name must be a string"),
    (FILLED.replace("= 60", '= "60"'), "must be a number"),
    (FILLED.replace("= 60", "= nan"), "finite percentage"),
    (FILLED.replace("= 40", "= 30"), "add up to 90%, not 100%"),
])
def test_an_invalid_group_file_is_one_line(tmp_path, body, message):
    with pytest.raises(cli.UserError, match=message):  # the build and make zip read it: one line each
        build.load_group(_group(tmp_path, body))


def test_a_template_shows_placeholders_and_a_filled_file_the_names(tmp_path, built):
    assert built[1]["group"]["placeholder"] and built[1]["group"]["name"] == "[Group name]"
    filled = build.load_group(_group(tmp_path, FILLED))
    assert not filled["placeholder"] and [m["contribution"] for m in filled["members"]] == ["60%", "40%"]


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """A real SIGINT while the build reads the results: summary.json is a named pipe, so the build waits in
    its read until the signal arrives."""
    fifo = tmp_path / "results" / "summary.json"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "report.build", "--results-dir", str(fifo.parent), "--out",
                             str(tmp_path / "r.pdf")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while True:  # opening the pipe's write end succeeds once the build has opened its read end
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(fd)
    assert proc.returncode == 130
    assert [line for line in err.splitlines() if line and not line.startswith("warning:")] == \
        ["report.build: interrupted (Ctrl-C); the report was not written; the results are untouched"]


def test_the_ece_is_computed_over_the_reliability_diagrams_bins(built, results):
    import plots
    rec = json.loads((results / "runs" / f"{json.loads((results / 'summary.json').read_text())['cnn']['key']}.json").read_text())
    conf, correct = np.asarray(rec["test_prob_max"]), np.asarray(rec["test_pred"]) == np.asarray(rec["test_true"])
    bins = plots.calibration_bins(conf, correct)
    assert sum(b["n"] for b in bins) == len(conf)
    assert built[1]["n"]["cnn.ece"] == pytest.approx(sum(b["n"] * abs(b["acc"] - b["conf"]) for b in bins) / len(conf))


# ------------------------------------------------------------------------------------------ the zip
def test_make_zip_packs_what_rebuilds_the_report(results, tmp_path):
    """`make zip` rebuilds the report, then packs every file git does not ignore under the group's name;
    `python -m report.build` in the unpacked folder gives the same PDF (it needs no data)."""
    repo = tmp_path / "repo"
    for rel in ["README.md", "Makefile", "requirements.txt", ".gitignore", *(p.name for p in REPO.glob("*.py")),
                *(f"report/{p.name}" for p in (REPO / "report").iterdir() if p.suffix in (".py", ".typ", ".bib"))]:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, repo / rel)
    shutil.copytree(results, repo / "results")
    # .venv/.installed, newer than requirements.txt: make's setup counts as done
    for rel in ("data/train.gz", ".venv/.installed", "results/.lock", "results/runs/j.json.bad", "old.zip"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
    _group(repo / "report", FILLED.replace('"team-7"', '"team 7/b"'))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    done = subprocess.run(["make", "-s", "zip", f"PY={sys.executable}"], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.endswith("wrote team-7-b.zip\n"), done.stderr
    with zipfile.ZipFile(repo / "team-7-b.zip") as zf:
        names = set(zf.namelist())
        assert not [n for n in names if "data/" in n or ".venv" in n or n.endswith((".lock", ".bad", ".zip"))]
        assert {"team-7-b/results/summary.json", "team-7-b/report/report.pdf", "team-7-b/cli.py"} <= names
        zf.extractall(tmp_path / "unzipped")
    root = tmp_path / "unzipped" / "team-7-b"
    done = subprocess.run([sys.executable, "-m", "report.build", "--out", str(tmp_path / "z.pdf")], cwd=root,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "z.pdf").read_bytes() == (root / "report" / "report.pdf").read_bytes()


def test_the_zip_name_refuses_a_bad_group_file_in_one_line(tmp_path, capsys):
    bad = _group(tmp_path, "group_name = 7\n")
    for group_file, message in ((tmp_path / "nope.toml", "nope.toml"), (bad, "group.toml")):
        assert build.main(["--zip-name", "--group-file", str(group_file)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("report.build: error: ") and message in err
