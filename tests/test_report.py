"""The report builds from results, says what the results say, refuses to contradict them; the zip.

The results directory the report is built from is SYNTHETIC: made here by `write_synthetic_results`
with random numbers in the results schema (never real results, never committed)."""
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import build  # noqa: E402
from report.pdftext import pdf_text  # noqa: E402

SECTIONS = ("Introduction", "Data and preprocessing", "The MLP from scratch", "The CNN backbone",
            "Training setup and evaluation metrics", "How to run", "MLP hyperparameter study",
            "CNN hyperparameter study", "Final models and test results", "Limitations", "References")


# ------------------------------------------------------------------------------------------ synthetic
def _png(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1])
    ax.set_title(path.stem)
    fig.savefig(path, dpi=50)
    plt.close(fig)


def write_synthetic_results(d: Path, seed=0) -> Path:
    """A schema-complete, clearly fake results directory (random accuracies)."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    studies = {
        "mlp": {"mlp_activation": ["relu", "leaky_relu", "tanh", "gelu", "sigmoid"],
                "mlp_depth": ["1", "2", "3", "4"], "mlp_dropout": ["0.0", "0.2", "0.5"],
                "mlp_final": ["final"]},
        "cnn": {"cnn_pool": ["max", "avg", "gap"], "cnn_init": ["random", "xavier", "he"],
                "cnn_final": ["final"]},
    }
    curves = []
    for model, grid in studies.items():
        rows = []
        for study, variants in grid.items():
            for vi, v in enumerate(variants):
                for s in (0, 1, 2) if not study.endswith("final") else (0,):
                    acc = 0.80 + 0.02 * vi + 0.003 * rng.standard_normal()
                    key = f"{study}-{v}-{s}"
                    arch = ({"filters": "double", "base_filters": 8, "kernel_size": 3,
                             "pool": v if study == "cnn_pool" else "max", "batchnorm": False, "head_hidden": "64"}
                            if model == "cnn" else {})
                    rows.append({"study": study, "variant": v, "seed": s, "lr": 1e-3, "epochs": 2, **arch,
                                 "batch_size": 128, "epochs_run": 2, "best_epoch": 2, "train_loss": 0.4,
                                 "train_acc": acc + 0.03, "val_loss": 0.5, "val_acc": acc, "test_loss": 0.5,
                                 "test_acc": acc - 0.005, "seconds": 3.0, "sec_per_epoch": 1.5,
                                 "device": "cpu", "n_params": 1000 * (vi + 1), "diverged": False, "key": key})
                    for ep in (1, 2):
                        curves.append({"key": key, "study": study, "variant": v, "seed": s, "epoch": ep,
                                       "lr": 1e-3, "train_loss": 1 / ep, "train_acc": acc - 0.1 / ep + 0.03,
                                       "val_loss": 1.1 / ep, "val_acc": acc - 0.1 / ep + 0.05 * (ep == 2)})
        pd.DataFrame(rows).to_csv(d / f"{model}_runs.csv", index=False)
    pd.DataFrame(curves).to_csv(d / "curves.csv", index=False)
    init = []
    for model, schemes in (("mlp", ["random", "xavier", "he", "relu", "tanh", "gelu", "sigmoid"]),
                           ("cnn", ["random", "xavier", "he"])):
        for si, sc in enumerate(schemes):
            for layer in range(1, 4 if model == "mlp" else 6):
                init.append({"model": model, "scheme": sc, "layer": layer, "act_mean": 0.1,
                             "act_std": (0.3 + si) * 0.8 ** layer, "dead_frac": 0.01 * si * (sc != "tanh"),
                             "grad_norm": 10.0 ** (si - layer)})
    pd.DataFrame(init).to_csv(d / "init_stats.csv", index=False)

    def final(acc, cfg):
        cm = (np.eye(10) * 900 + rng.integers(0, 20, (10, 10))).astype(int)
        return {"config": cfg, "val_acc": acc + 0.004, "test_acc": acc, "test_macro_f1": acc - 0.001,
                "per_class": [{"class": c, "precision": 0.8 + 0.01 * i, "recall": 0.9 - 0.012 * i,
                               "f1": 0.85} for i, c in enumerate(build.CLASS_NAMES)],
                "confusion": cm.tolist(), "train_seconds": 123.0, "epochs_run": 2, "n_params": 123456}

    summary = {
        "mlp": final(0.8765, {"hidden": [512, 256], "activation": "gelu", "dropout": 0.2, "optimizer": "adamw",
                              "lr": 0.001, "schedule": "cosine", "epochs": 2, "batch_size": 128}),
        "cnn": final(0.9123, {"filters": "double", "base_filters": 16, "kernel_size": 3, "pool": "max",
                              "init": "he", "batchnorm": False, "head_mode": "joint", "optimizer": "adamw",
                              "lr": 0.003, "schedule": "onecycle", "epochs": 2, "batch_size": 128}),
        "study": {"quick": True, "seconds": 100.0, "seeds": [0, 1, 2], "device": "cpu",
                  "finished_at": "synthetic", "versions": {"numpy": np.__version__},
                  "grid_budget": {"mlp": "synthetic", "cnn": "synthetic"}},
    }
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "figures").mkdir(exist_ok=True)
    for name in build.FIGURES.values():
        _png(d / "figures" / name)
    return d


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def results_dir(request, tmp_path_factory):
    """The quick study's results when conftest.py provides them (fixture `quick_results`: a results
    folder made once per session by `run_experiments.py --quick`), else a synthetic folder."""
    try:
        return Path(request.getfixturevalue("quick_results"))
    except pytest.FixtureLookupError:
        return write_synthetic_results(tmp_path_factory.mktemp("synthetic-results"))


@pytest.fixture(scope="module")
def built(results_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pdf") / "report.pdf"
    build.build_report(results_dir, out)
    return out, pdf_text(out)


def _norm(s):
    return " ".join(s.split())


# ------------------------------------------------------------------------------------------ tests
def test_report_has_every_section(built):
    _pdf, text = built
    missing = [s for s in SECTIONS if s not in _norm(text)]
    assert not missing, missing


def test_report_has_final_numbers(built, results_dir):
    _pdf, text = built
    summary = json.loads((results_dir / "summary.json").read_text())
    flat = _norm(text)
    for model in ("mlp", "cnn"):
        assert f"{100 * summary[model]['test_acc']:.2f}%" in flat
        assert f"{100 * summary[model]['val_acc']:.2f}%" in flat
        assert f"{summary[model]['test_macro_f1']:.4f}" in flat


def test_claims_hold_and_cover_every_winner(results_dir):
    facts = build.make_facts(build.load_results(results_dir))
    build.check_claims(results_dir, facts)  # no contradiction on the untouched results
    studies = {c["study"] for c in facts["claims"] if c["type"] == "winner"}
    assert {"mlp_activation", "mlp_depth", "mlp_dropout", "cnn_pool", "cnn_init"} <= studies


def _doctored_copy(results_dir, tmp_path):
    import shutil
    d = tmp_path / "doctored"
    shutil.copytree(results_dir, d)
    return d


def test_contradiction_check_fails_on_swapped_winner(results_dir, tmp_path):
    facts = build.make_facts(build.load_results(results_dir))
    winner = next(c["variant"] for c in facts["claims"] if c["type"] == "winner" and c["study"] == "mlp_activation")
    d = _doctored_copy(results_dir, tmp_path)
    runs = pd.read_csv(d / "mlp_runs.csv")
    study = runs["study"] == "mlp_activation"
    means = runs[study].groupby("variant")["val_acc"].mean()
    loser = means.idxmin()
    # Swap the best and the worst activation's validation accuracies, after the facts were made.
    w, lo = study & (runs["variant"] == winner), study & (runs["variant"] == loser)
    wv, lv = runs.loc[w, "val_acc"].to_numpy().copy(), runs.loc[lo, "val_acc"].to_numpy().copy()
    runs.loc[w, "val_acc"], runs.loc[lo, "val_acc"] = lv - 0.01, wv  # (- 0.01: even if they were tied)
    runs.to_csv(d / "mlp_runs.csv", index=False)
    with pytest.raises(build.ContradictionError, match="mlp_activation"):
        build.check_claims(d, facts)


def test_contradiction_check_fails_on_changed_test_accuracy(results_dir, tmp_path):
    facts = build.make_facts(build.load_results(results_dir))
    d = _doctored_copy(results_dir, tmp_path)
    summary = json.loads((d / "summary.json").read_text())
    summary["cnn"]["test_acc"] -= 0.01
    (d / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(build.ContradictionError, match="cnn.test_acc"):
        build.check_claims(d, facts)


def test_build_stops_on_contradiction(results_dir, tmp_path, monkeypatch):
    """build_report itself runs the check: facts made from other results than the files -> no PDF."""
    d = _doctored_copy(results_dir, tmp_path)
    real_make = build.make_facts
    stale = real_make(build.load_results(results_dir))
    runs = pd.read_csv(d / "cnn_runs.csv")
    runs.loc[runs["study"] == "cnn_pool", "val_acc"] = runs.loc[runs["study"] == "cnn_pool", "val_acc"][::-1].to_numpy()
    runs.to_csv(d / "cnn_runs.csv", index=False)
    monkeypatch.setattr(build, "make_facts", lambda results, group=None: stale)
    out = tmp_path / "r.pdf"
    with pytest.raises(build.ContradictionError):
        build.build_report(d, out)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ group.toml
def _group(tmp_path, text):
    p = tmp_path / "group.toml"
    p.write_text(text)
    return p


FILLED = """group_name = "team-7"
[[member]]
name = "Ada Lovelace"
email = "ada@example.org"
contribution = 60
[[member]]
name = "Alan Turing"
email = "alan@example.org"
contribution = 40
"""


def test_group_contributions_must_sum_to_100(tmp_path, results_dir):
    bad = _group(tmp_path, FILLED.replace("= 40", "= 30"))
    with pytest.raises(build.ReportError, match="add up to 90%, not 100%"):
        build.load_group(bad)
    assert build.main(["--results-dir", str(results_dir), "--out", str(tmp_path / "r.pdf"),
                       "--group-file", str(bad)]) == 1
    assert not (tmp_path / "r.pdf").exists()


def test_group_filled_and_placeholder(tmp_path, capsys):
    g = build.load_group(_group(tmp_path, FILLED))
    assert not g["placeholder"] and g["zip_name"] == "team-7"
    assert [m["contribution"] for m in g["members"]] == ["60%", "40%"]
    template = build.load_group(build.GROUP_FILE)  # the committed template may be filled in by the group
    if template["placeholder"]:
        assert template["zip_name"] == "group-name"


def test_filled_group_reaches_pdf(tmp_path, results_dir):
    out = build.build_report(results_dir, tmp_path / "r.pdf", _group(tmp_path, FILLED))
    text = _norm(pdf_text(out))
    for s in ("team-7", "Ada Lovelace", "ada@example.org", "60%", "Alan Turing"):
        assert s in text
    assert "[Member 1 name]" not in text


def test_placeholders_shown_and_warned(built, capsys):
    _pdf, text = built
    if build.load_group(build.GROUP_FILE)["placeholder"]:
        assert "[Member 1 name]" in text and "[Group name]" in text


# ------------------------------------------------------------------------------------------ zip
def test_zip_holds_exactly_the_submission(tmp_path, built):
    import shutil
    import make_zip
    repo = tmp_path / "repo"
    for rel in ("a.py", "README.md", "Makefile", "requirements.txt", "requirements-dev.txt", ".ci/run",
                "report/build.py", "report/__init__.py", "report/report.typ", "report/references.bib",
                "tests/test_x.py", "tests/conftest.py", "benchmarks/bench.py", "results/mlp_runs.csv",
                "results/summary.json",
                # none of these may go in:
                "data/fashion-mnist/train.gz", ".venv/bin/python", "tests/__pycache__/x.pyc",
                "report/__pycache__/build.pyc", "report/build/facts.json", "results/models/mlp_best.npz",
                "results/figures/a.png", "results/runs/k.json", ".pytest_cache/v", "notes.txt",
                "old.zip"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
    _group(repo / "report", FILLED)
    with pytest.raises(make_zip.ZipError, match="report.pdf is missing"):
        make_zip.make_zip(repo)
    shutil.copy(built[0], repo / "report" / "report.pdf")
    out = make_zip.make_zip(repo)
    assert out.name == "team-7.zip"
    with zipfile.ZipFile(out) as zf:
        names = sorted(zf.namelist())
    expected = sorted("team-7/" + r for r in (
        "a.py", "README.md", "Makefile", "requirements.txt", "requirements-dev.txt", ".ci/run",
        "report/build.py", "report/__init__.py", "report/report.typ", "report/references.bib",
        "report/group.toml", "report/report.pdf", "tests/test_x.py", "tests/conftest.py",
        "benchmarks/bench.py", "results/mlp_runs.csv", "results/summary.json"))
    assert names == expected
