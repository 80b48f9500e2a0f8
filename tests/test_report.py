"""The report builds from results, says what the results say (each explanation follows the measured
direction and noise), refuses to contradict them; the figures read at print size; the zip.

Every results folder here is SYNTHETIC: `write_synthetic_results` writes random numbers in the results
schema of study_results.py (records, manifest, summary, CSVs) in well under a second; no study is run."""
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mlp_scratch
import run_experiments
import study_results
from preprocessing import CLASS_NAMES
from report import build

REPO = Path(__file__).resolve().parents[1]


def _stage_layout(stage) -> tuple[dict, str, list, list]:
    """(start config, the default's label, the levels, the contrast levels) of one stage of the study's own
    table, laid out as the full study lays out a stage around the module default: the synthetic results follow
    the study when a stage, a level or a default changes. Every stage sits around the module default here (the
    real study chains them, each around the winner before it): the test's choice, so that the default is known."""
    plan = run_experiments.FULL_PLAN
    cfg = run_experiments.start_config(stage.model, plan)
    levels, default = run_experiments.Study(None, plan).levels(stage, cfg)
    return cfg, default, levels, [lv.variant for lv in levels if not lv.eligible]


@functools.cache
def study_layout() -> dict:
    """{stage id: _stage_layout(stage)} for every stage of run_experiments.STAGES, in the study's order."""
    return {stage.id: _stage_layout(stage) for stage in run_experiments.STAGES}


def _history(acc, epochs, phase_at=None):
    out = []
    for e in range(1, epochs + 1):
        h = {"epoch": e, "lr": 1e-3, "train_loss": 1.0 / e, "train_acc": acc + 0.02 - 0.1 / e,
             "val_loss": 1.1 / e, "val_acc": acc - 0.08 / e, "seconds": 1.0}
        if phase_at is not None:
            h["phase"] = "backbone" if e < phase_at else "head"
        out.append(h)
    return out


def _record(model, study, variant, seed, role, val, cfg, rng, n_test=None, epochs=4):
    key = f"{study}-{variant}-{seed}".replace(",", "_").replace(" ", "_")
    rec = {"key": key, "model": model, "study": study, "variant": variant, "seed": seed, "role": role,
           "final": role == "final", "plan": "full", "config": cfg, "budget": {"subset": 20000, "epochs": epochs},
           "n_train": 54000, "n_val": 6000, "n_test": n_test, "epochs_run": epochs, "best_epoch": epochs,
           "train_loss": 0.3, "train_acc": val + 0.02, "val_loss": 0.35, "val_acc": val,
           "seconds": 30.0, "sec_per_epoch": 30.0 / epochs, "threads": 2, "device": "cpu",
           "n_params": 669706 if model == "mlp" else 400000, "macs": 668672 if model == "mlp" else 12_000_000,
           "diverged": False, "error": None, "layer_stats": None, "finished_at": "2026-01-01T00:00:00",
           "history": _history(val, epochs, 4 if (role == "final" and cfg.get("head_mode") == "frozen") else None)}
    if role == "final":
        y = np.repeat(np.arange(10), n_test // 10)
        pred = np.where(rng.random(n_test) < val, y, (y + 1) % 10)
        cm = np.zeros((10, 10), int)
        np.add.at(cm, (y, pred), 1)
        rec.update(test_loss=0.3, test_acc=float((pred == y).mean()), test_pred=pred.tolist(),
                   test_prob_max=rng.uniform(0.3, 1.0, n_test).round(4).tolist(), test_macro_f1=val - 0.002,
                   model_file=f"models/runs/{key}" + (".npz" if model == "mlp" else ""), confusion=cm.tolist(),
                   per_class=[{"class": c, "precision": 0.8 + 0.01 * i, "recall": float(cm[i, i] / cm[i].sum()),
                               "f1": 0.85} for i, c in enumerate(CLASS_NAMES)])
    return rec


def _effects(levels, default, mode):
    """Level i's accuracy offset: rising with i ('base'), falling ('flip'), or far below the noise ('tie')."""
    d = levels.index(default)
    scale = {"base": 0.006, "flip": -0.006, "tie": 0.00005}[mode]
    return {v: scale * (i - d) for i, v in enumerate(levels)}


def _table_row(recs):
    val = np.array([r["val_acc"] for r in recs])
    tr = np.array([r["train_acc"] for r in recs])
    n = len(recs)
    return {"variant": recs[0]["variant"], "n": n, "val_acc": float(val.mean()),
            "val_acc_std": float(val.std(ddof=1)) if n > 1 else None, "train_acc": float(tr.mean()),
            "train_acc_std": float(tr.std(ddof=1)) if n > 1 else None, "n_params": recs[0]["n_params"],
            "macs": recs[0]["macs"], "seconds": 30.0, "diverged": False}


def _final_summary(model, chain, default, seeds_recs):
    cands = [chain] + ([default] if default else [])
    kept = max(cands, key=lambda r: r["val_acc"])
    accs = [r["test_acc"] for r in seeds_recs]
    return {"test_acc": kept["test_acc"], "val_acc": kept["val_acc"], "test_macro_f1": kept["test_macro_f1"],
            "per_class": kept["per_class"], "confusion": kept["confusion"], "config": kept["config"],
            "key": kept["key"], "kept": "chain" if kept is chain else "default",
            "matches_module_default": default is None, "train_seconds": 300.0, "epochs_run": 4,
            "n_params": kept["n_params"], "macs": kept["macs"], "test_acc_wilson95": list(study_results.wilson_interval(kept["test_acc"] * 10000, 10000)),
            "seeds": [{"seed": r["seed"], "key": r["key"], "val_acc": r["val_acc"], "test_acc": r["test_acc"]}
                      for r in seeds_recs],
            "test_acc_mean": float(np.mean(accs)),
            "test_acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
            "candidates": [{"name": "chain" if r is chain else "default", "key": r["key"], "val_acc": r["val_acc"],
                            "test_acc": r["test_acc"], "config": r["config"]} for r in cands]}


def _write_tables(d, records):
    import cnn_torch  # torch: imported when a folder is written, not when the tests are collected
    rows = []
    for r in records:
        row = {k: r[k] for k in ("model", "study", "variant", "seed", "key", "role", "epochs_run", "best_epoch",
                                 "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "n_params", "macs",
                                 "diverged")}
        rows.append({**row, **{k: (" ".join(map(str, v)) if isinstance(v, list) else v)
                               for k, v in r["config"].items()}})
    df = pd.DataFrame(rows)
    for model in ("mlp", "cnn"):
        df[(df["model"] == model) & (df["role"] != "final")].to_csv(d / f"{model}_runs.csv", index=False)
    fin = [{"model": r["model"], "study": r["study"], "variant": r["variant"], "seed": r["seed"], "key": r["key"],
            "val_acc": r["val_acc"], "test_acc": r["test_acc"], "test_macro_f1": r["test_macro_f1"]}
           for r in records if r["final"]]
    pd.DataFrame(fin).to_csv(d / "finals.csv", index=False)
    pd.DataFrame([{"key": r["key"], "study": r["study"], "variant": r["variant"], "seed": r["seed"], **h}
                  for r in records for h in r["history"]]).to_csv(d / "curves.csv", index=False)
    init = [{"model": m, "scheme": s, "batchnorm": bn, "layer": layer, "act_mean": 0.1,
             "act_std": (0.01 if s == "random" and not bn else 0.6) * (0.8 if s != "he" else 1.0) ** layer,
             "dead_frac": 0.0 if bn else 0.02 * layer, "grad_norm": 10.0 ** (-layer if s == "random" else -1)}
            for m, schemes, bns in (("mlp", mlp_scratch.INITS + mlp_scratch.ACTIVATIONS, [False]),
                                    ("cnn", cnn_torch.INITS, [True, False]))
            for s in schemes for bn in bns for layer in range(1, 6 if m == "cnn" else 4)]
    pd.DataFrame(init).to_csv(d / "init_stats.csv", index=False)


def write_synthetic_results(d: Path, mode="base", seeds=(0, 1, 2)) -> Path:
    """A schema-complete, clearly fake results folder. mode: 'base' (higher levels win by far more than
    the noise), 'flip' (the reverse), 'tie' (every gap far inside the noise)."""
    rng = np.random.default_rng(0)
    d = Path(d)
    (d / "runs").mkdir(parents=True, exist_ok=True)
    records, stages, manifest_stages = [], {}, {}
    for stage in run_experiments.STAGES:
        study, model, ordered = stage.id, stage.model, stage.beyond is not None
        start, default, levels, contrast = study_layout()[study]
        names = [lv.variant for lv in levels]
        # The outcome is the test's own: the accuracies are made up so that each stage comes out as `mode` says.
        eff = _effects(names, default, mode)
        base = 0.89 if model == "mlp" else 0.925
        role = "ablation" if stage is run_experiments.ABLATION_STAGE else "grid"
        table = []
        for lv in levels:
            cfg = run_experiments.apply(start, lv.changes)
            # seed noise of std 0.001 that averages out: a level's mean is exactly base + its effect
            recs = [_record(model, study, lv.variant, s, role, base + eff[lv.variant] + 0.001 * (s - np.mean(seeds)),
                            cfg, rng) for s in seeds]
            records += recs
            table.append(_table_row(recs))
        eligible = [r for r in table if r["variant"] not in contrast]
        winner = max(eligible, key=lambda r: r["val_acc"])["variant"]
        manifest_stages[study] = {"model": model, "factor": stage.factor, "ordered": ordered, "default": default,
                                  "winner": winner, "levels": names, "contrast": contrast, "extended": False,
                                  "edge": ordered and winner in (names[0], names[-1])}
        stages[study] = {**manifest_stages[study], "table": table}
    finals = {}
    for model, acc in (("mlp", 0.905), ("cnn", 0.945)):
        cfg = run_experiments.start_config(model, run_experiments.FULL_PLAN)
        chain = [_record(model, f"{model}_final", "chain", s, "final", acc, cfg, rng, 10000, 6) for s in seeds]
        default = _record(model, f"{model}_final", "default", 0, "final",
                          acc - (0.004 if mode != "flip" else -0.004), cfg, rng, 10000, 6)
        records += chain + [default]
        finals[model] = (chain, default)
    for r in records:
        (d / "runs" / f"{r['key']}.json").write_text(json.dumps(r))
    summary = {m: _final_summary(m, ch[0], de, ch) for m, (ch, de) in finals.items()}
    summary["mcnemar"] = [
        {"a": "MLP", "b": "CNN", "a_key": summary["mlp"]["key"], "b_key": summary["cnn"]["key"], "n01": 150,
         "n10": 550, "p_value": 1.2e-51, "acc_a": summary["mlp"]["test_acc"], "acc_b": summary["cnn"]["test_acc"]},
        {"a": "MLP chain", "b": "MLP default", "a_key": finals["mlp"][0][0]["key"], "b_key": finals["mlp"][1]["key"],
         "n01": 120, "n10": 131, "p_value": 0.53, "acc_a": finals["mlp"][0][0]["test_acc"],
         "acc_b": finals["mlp"][1]["test_acc"]}]
    summary["stages"] = {s: v for s, v in stages.items() if s != "cnn_ablation"}
    summary["ablation"] = stages["cnn_ablation"]
    summary["study"] = {"plan": "full", "seeds": list(seeds), "grid_budget": {"mlp": {"subset": 20000, "epochs": 10},
                        "cnn": {"subset": 20000, "epochs": 4}}, "n_runs": len(records), "n_diverged": 0,
                        "seconds": 3000.0, "wall_seconds": 2000.0, "workers": 2, "finished_at": "synthetic",
                        "versions": {"numpy": np.__version__}}
    (d / "summary.json").write_text(json.dumps(summary))
    manifest = {"plan": "full", "seeds": list(seeds),
                "runs": [{k: r[k] for k in ("model", "study", "variant", "seed", "key", "role")} for r in records],
                "stages": manifest_stages,
                "finals": {m: {"chain": ch[0]["key"], "default": de["key"], "kept": summary[m]["kept"],
                               "seeds": [r["key"] for r in ch]} for m, (ch, de) in finals.items()}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    _write_tables(d, records)
    return d


# ------------------------------------------------------------------------------------------ fixtures
SECTIONS = ("Data and preprocessing", "The MLP from scratch", "Gradient checks", "The CNN", "Study design",
            "MLP study", "CNN study", "Initialisation with and without BatchNorm", "Recipe ablation",
            "Final models", "What the models learned", "Conclusion", "How to run")
TEMPLATE = '''group_name = ""
[[member]]
name = ""
email = ""
'''
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


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Synthetic results in three outcomes: 'base', 'flip' (every ranking reversed), 'tie' (inside the noise)."""
    root = tmp_path_factory.mktemp("synthetic")
    return {mode: write_synthetic_results(root / mode, mode) for mode in ("base", "flip", "tie")}


@pytest.fixture(scope="module")
def facts(results, tmp_path_factory):
    group = build.load_group(_group(tmp_path_factory.mktemp("group"), TEMPLATE))
    return {mode: build.make_facts(build.load_results(d), group) for mode, d in results.items()}


def _committed_figures(d: Path) -> None:
    """The committed study's figures (plots.py's drawing is tested apart): the page layout at their real sizes."""
    import plots
    (d / "figures").mkdir(exist_ok=True)
    for fname in plots.FIGURES:
        shutil.copy(REPO / "results" / "figures" / fname, d / "figures" / fname)


@pytest.fixture(scope="module")
def built(results, tmp_path_factory):
    """The PDF and its facts.json, built from the base results (with the committed figures) and a template
    group file."""
    _committed_figures(results["base"])
    tmp = tmp_path_factory.mktemp("built")
    group = tmp / "group.toml"
    group.write_text(TEMPLATE)
    out = build.build_report(results["base"], tmp / "report.pdf", group, tmp / "facts.json")
    return out, json.loads((tmp / "facts.json").read_text())


def _group(tmp_path, body):
    p = tmp_path / "group.toml"
    p.write_text(body)
    return p


# ------------------------------------------------------------------------------------------ build
def test_pdf_built_with_every_section_in_order(built):
    """The PDF's outline (its bookmarks, one per numbered heading, stored as plain strings) lists every
    section, numbered in the order of SECTIONS."""
    pdf, _facts = built
    data = pdf.read_bytes()
    assert data[:5] == b"%PDF-"
    outline = dict(t.decode().split(" ", 1)[::-1] for t in re.findall(rb"/Title ?\(([\d.]+ [^)]*)\)", data))
    missing = [s for s in SECTIONS if s not in outline]
    assert not missing, (missing, outline)
    numbers = [tuple(int(n) for n in outline[s].split(".")) for s in SECTIONS]
    assert numbers == sorted(numbers), numbers


def test_page_limits(built):
    _pdf, f = built
    assert not f["missing_figures"]
    assert f["pages"]["body"] <= build.MAX_BODY_PAGES and f["pages"]["total"] <= build.MAX_PAGES, f["pages"]


def test_numbers_come_from_results(built, results):
    _pdf, f = built
    summary = json.loads((results["base"] / "summary.json").read_text())
    def percents(text):  # every "12.34%" in a phrase, as a fraction
        return [float(p) / 100 for p in re.findall(r"(\d+\.\d\d)%", text)]
    for model in ("mlp", "cnn"):
        stated = percents(f["final"][model]["test_acc"]) + percents(f["final"][model]["wilson"])
        assert stated == pytest.approx([summary[model]["test_acc"], *summary[model]["test_acc_wilson95"]], abs=5e-5)
    grad = json.loads((results["base"] / "gradcheck.json").read_text())
    assert max(r["fd"] for r in grad["rows"]) < 1e-6 and max(r["torch"] for r in grad["rows"]) < 1e-10
    assert len(f["conclusion"]) == 5 and [c[0] for c in f["conclusion"]] == ["Q2f", "Q3a", "Q3b", "Q3c", "Q3d"]


def _expected(study, mode):
    _cfg, default, levels, contrast = study_layout()[study]
    levels = [lv.variant for lv in levels if lv.variant not in contrast]
    best = {"base": levels[-1], "flip": levels[0]}.get(mode)
    return best, default


@pytest.mark.parametrize("study", [s.id for s in run_experiments.STAGES if s is not run_experiments.ABLATION_STAGE])
def test_each_explanation_follows_the_outcome(facts, study):
    """Reversing the ranking, or shrinking every gap inside the noise, changes what the sentence says."""
    from report.text import name
    got = {mode: next(s for s in f["studies_mlp"] + f["studies_cnn"] if s["id"] == study)
           for mode, f in facts.items()}
    for mode in ("base", "flip"):
        best, default = _expected(study, mode)
        assert got[mode]["kind"] == ("default_clear" if best == default else "other_clear"), mode
        assert name(study, best).lower() in got[mode]["sentence"].lower()
    assert got["tie"]["kind"].endswith("_close")
    sentences = [got[m]["sentence"] for m in ("base", "flip", "tie")]
    assert len(set(sentences)) == 3, sentences


def test_ablation_and_choice_sentences_flip(facts):
    assert "raised it beyond the noise" in facts["base"]["ablation"]["sentence"]
    assert "lowered validation accuracy by more than the noise" in facts["flip"]["ablation"]["sentence"]
    assert "less than the noise" in facts["tie"]["ablation"]["sentence"]
    assert "For the MLP, the chain of stage winners reached" in facts["base"]["final"]["kept_sentence"]
    assert "so the chain was kept" in facts["base"]["final"]["kept_sentence"]
    assert "so the default was kept" in facts["flip"]["final"]["kept_sentence"]
    q3a = {mode: dict((c[0], c[1]) for c in f["conclusion"])["Q3a"] for mode, f in facts.items()}
    assert q3a["base"].startswith("Global average pooling came first") and "more than the seed noise" in q3a["base"]
    assert q3a["flip"].startswith("Max pooling came first") and "within" in q3a["tie"]


def test_no_sentence_template_in_more_than_two_sections(facts):
    """A sentence's skeleton (numbers and level names blanked) appears in at most two sections."""
    from report.text import name
    seen = {}
    for s in [s for f in facts.values() for s in f["studies_mlp"] + f["studies_cnn"]]:
        body = s["sentence"]
        for v in sorted((lv.variant for lv in study_layout()[s["id"]][2]), key=lambda v: -len(name(s["id"], v))):
            body = body.replace(name(s["id"], v), "L")
        for sentence in re.split(r"(?<=\.) ", re.sub(r"\([^)]*\)", "()", body)):
            seen.setdefault(re.sub(r"[\d.]+", "#", sentence), set()).add(s["id"])
    repeated = {k: v for k, v in seen.items() if len(v) > 2}
    assert not repeated, repeated


def test_stale_facts_stop_the_build(results, facts, tmp_path, monkeypatch):
    """Facts made from other results than the files on disk: check_claims names the stage, no PDF."""
    with pytest.raises(build.ContradictionError, match="mlp_activation"):
        build.check_claims(results["flip"], facts["base"])
    monkeypatch.setattr(build, "make_facts", lambda res, group=None: facts["base"])
    out = tmp_path / "r.pdf"
    with pytest.raises(build.ContradictionError):
        build.build_report(results["flip"], out, _group(tmp_path, FILLED))
    assert not out.exists()


def test_one_seed_builds_and_says_so(tmp_path):
    d = write_synthetic_results(tmp_path / "one", "base", seeds=(0,))
    out = build.build_report(d, tmp_path / "r.pdf", _group(tmp_path, FILLED), tmp_path / "facts.json")
    f = json.loads((tmp_path / "facts.json").read_text())
    assert out.is_file() and f["design"]["one_seed"]
    assert f["final"]["mlp"]["seeds"].startswith("one seed only")
    assert all(s["kind"].endswith("_close") for s in f["studies_mlp"] + f["studies_cnn"] if s["kind"])
    assert "not measured with one seed" in f["studies_mlp"][0]["sentence"]


def test_pdf_written_atomically(results, tmp_path, monkeypatch):
    import typst
    out = tmp_path / "r.pdf"
    out.write_bytes(b"%PDF-old")

    def fail(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(typst, "compile", fail)
    with pytest.raises(build.ReportError, match="No space left"):
        build.build_report(results["base"], out, _group(tmp_path, FILLED))
    assert out.read_bytes() == b"%PDF-old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["group.toml", "r.pdf"]  # no temporary left


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.update(mlp=None), "mlp is not an object"),
    (lambda s: s["cnn"].pop("key"), "cnn has no 'key'"),
    (lambda s: s["cnn"].update(test_acc=1.5), "cnn has test_acc outside"),
    (lambda s: s["mlp"].update(val_acc="high"), "mlp has val_acc outside"),
    (lambda s: s["mlp"].update(confusion=[[1, 2], [3]]), "mlp has a confusion matrix that is not 10 x 10"),
])
def test_a_damaged_summary_stops_the_report_with_one_line(results, tmp_path, capsys, damage, message):
    d = tmp_path / "results"
    shutil.copytree(results["base"], d)
    summary = json.loads((d / "summary.json").read_text())
    damage(summary)
    (d / "summary.json").write_text(json.dumps(summary))
    assert build.main(["--results-dir", str(d), "--out", str(tmp_path / "r.pdf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("report.build: error: ") and message in err[-1] and not (tmp_path / "r.pdf").exists()


def test_a_damaged_figure_is_named_in_one_line(results, tmp_path, capsys):
    d = tmp_path / "r"
    shutil.copytree(results["base"], d)
    _committed_figures(d)
    png = d / "figures" / "confusion.png"
    png.write_bytes(png.read_bytes()[:-20])  # cut off: Typst would only say "failed to decode image"
    assert build.main(["--results-dir", str(d), "--out", str(tmp_path / "r.pdf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"report.build: error: {png} is damaged (") and err[-1].endswith(f"plots.py --results-dir {d}")
    assert not (tmp_path / "r.pdf").exists()


def test_an_output_path_that_cannot_be_written_is_one_line(results, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for args in (["--out", str(blocker / "x")], ["--out", str(tmp_path / "r.pdf"), "--facts", str(blocker / "x")]):
        assert build.main(["--results-dir", str(results["base"]), *args]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"report.build: error: cannot write {blocker / 'x'}") and "Traceback" not in "".join(err)


# ------------------------------------------------------------------------------------------ group.toml
@pytest.mark.parametrize("body, message", [
    ("group_name = [", "not valid TOML"),
    ('group_name = 7', "group_name must be a string"),
    (FILLED.replace('"Ada Lovelace"', "3"), "name must be a string"),
    (FILLED.replace("= 60", '= "60"'), "must be a number"),
    (FILLED.replace("= 60", "= nan"), "finite percentage"),
    (FILLED.replace("= 60", "= -60").replace("= 40", "= 160"), "finite percentage"),
    (FILLED.replace("= 40", "= 30"), "add up to 90%, not 100%"),
])
def test_invalid_group_is_one_line(tmp_path, results, capsys, body, message):
    bad = _group(tmp_path, body)
    with pytest.raises(build.ReportError, match=message):
        build.load_group(bad)
    assert build.main(["--results-dir", str(results["base"]), "--out", str(tmp_path / "r.pdf"),
                       "--group-file", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("report.build: error: ") and message.split()[0] in err[0]
    assert not (tmp_path / "r.pdf").exists()


def test_a_group_file_that_is_not_there_is_one_line(tmp_path, results, capsys):
    for missing in (tmp_path / "grup.toml", tmp_path):
        assert build.main(["--results-dir", str(results["base"]), "--out", str(tmp_path / "r.pdf"),
                           "--group-file", str(missing)]) == 1
        assert capsys.readouterr().err == f"report.build: error: {missing}: no such file (see the comments in report/group.toml)\n"
    assert not (tmp_path / "r.pdf").exists()


def test_placeholders_shown_and_warned(tmp_path, built, capsys):
    """A template builds, shows placeholders and warns once; a filled file shows the names and does not warn.
    The committed group.toml is one of the two."""
    _pdf, f = built
    assert f["group"]["placeholder"] and f["group"]["name"] == "[Group name]"
    assert f["group"]["members"][0] == {"name": "[Member 1 name]", "email": "[member1 email]",
                                        "contribution": "[contribution %]"}
    filled = build.load_group(_group(tmp_path, FILLED))
    assert not filled["placeholder"] and filled["zip_name"] == "team-7"
    assert [m["contribution"] for m in filled["members"]] == ["60%", "40%"]
    assert "placeholder(m.name)" in build.TYP_SOURCE.read_text()  # the Typst marks placeholders in red
    committed = build.load_group(build.GROUP_FILE)
    capsys.readouterr()
    build.build_report(write_synthetic_results(tmp_path / "r", "base"), tmp_path / "r.pdf", build.GROUP_FILE)
    warnings = [l for l in capsys.readouterr().err.splitlines() if "group.toml" in l]
    assert len(warnings) == (1 if committed["placeholder"] else 0)


# ------------------------------------------------------------------------------------------ figures
def test_figures_print_at_size_and_fail_alone(results, capsys):
    import plots
    import study_results
    d = results["base"]
    recs, _ = study_results.load_runs(d)
    summary = json.loads((d / "summary.json").read_text())
    written = plots.make_figures(d, recs, summary, None,
                                 only=("per_class.png", "cnn_filters.png"))
    assert [p.name for p in written] == ["per_class.png"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cnn_filters.png" in err[0]  # no saved model: one line, the others drawn
    assert not list((d / "figures").glob("*.tmp"))
    plt = plots._plt()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_title("tiny", fontsize=5)
    with pytest.raises(ValueError, match="under 7 pt"):
        plots.save(fig, d / "figures" / "tiny.png")


def _plots_cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "plots.py"), *args], capture_output=True, text=True, **kw)


def test_plots_refuses_a_results_folder_that_is_a_file_empty_or_missing(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    for where, why in (("a_file", "is not a folder"), ("missing", "is not there"), ("empty", "holds no study results")):
        result = _plots_cli("--results-dir", str(tmp_path / where), "--no-data")
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"plots.py: error: {tmp_path / where} {why}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a_file", "empty"]  # nothing created or written


@pytest.mark.parametrize("command, blocking_file, message", [
    (["plots.py", "--no-data"], "runs/k.json",
     "plots.py: interrupted (Ctrl-C); the figures already drawn are kept, none half-written"),
    (["-m", "report.build", "--out", "r.pdf"], "summary.json",
     "report.build: interrupted (Ctrl-C); the report was not written; the results are untouched"),
])
def test_ctrl_c_is_one_line_and_exit_130(tmp_path, command, blocking_file, message):
    """A real SIGINT while the script reads the results: one file is a named pipe, so the script waits in its
    read, at a known point, until the signal arrives."""
    fifo = tmp_path / "results" / blocking_file
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    script = [str(REPO / command[0])] if command[0].endswith(".py") else command[:2]
    rest = command[1:] if command[0].endswith(".py") else command[2:]
    proc = subprocess.Popen([sys.executable, *script, "--results-dir", str(tmp_path / "results"), *rest],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:  # opening the pipe's write end succeeds once the script has opened its read end
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
    assert [line for line in err.splitlines() if line and not line.startswith("warning:")] == [message]
    assert not (tmp_path / "results" / "r.pdf").exists()


def test_plots_redraws_a_figure_from_the_saved_model_when_the_record_lacks_predictions(tmp_path, synthetic_splits):
    """The confident-mistakes figure recomputes predictions from the final model when the record's own do not
    cover the test set (a quick study's subset): the saved file, loaded back, gives them."""
    import mlp_scratch
    import plots
    model = mlp_scratch.MLP(784, [16], 10, seed=0)
    model.save(tmp_path / "models" / "m.npz")
    n = len(synthetic_splits.y_test)
    records = [{"key": "k", "model": "mlp", "final": True, "model_file": "models/m.npz"},
               {"key": "c", "model": "cnn", "final": True, "test_pred": [0] * n, "test_prob_max": [0.5] * n}]
    written = plots.make_figures(tmp_path, records, {}, synthetic_splits, only=("confident_mistakes.png",))
    assert [p.name for p in written] == ["confident_mistakes.png"]
    stats = json.loads((tmp_path / "figures" / "mistakes.json").read_text())
    pred = model.forward(synthetic_splits.X_test).argmax(axis=1)
    assert stats["mlp"]["n_wrong"] == int((pred != synthetic_splits.y_test).sum())


# ------------------------------------------------------------------------------------------ zip
def test_zip_holds_what_rebuilds_the_report(tmp_path, built):
    import cli
    import make_zip
    repo = tmp_path / "repo"
    for rel in ("a.py", "README.md", "Makefile", "requirements.txt", "pytest.ini", ".ci/run", "report/build.py",
                "report/__init__.py", "report/report.typ", "report/references.bib", "tests/test_x.py",
                "benchmarks/bench.py", "results/mlp_runs.csv", "results/summary.json", "results/manifest.json",
                "results/gradcheck.json", "results/cnn_recipe_sweep.jsonl", "results/models/mlp_best.npz",
                "results/models/cnn_best/backbone.pt", "results/runs/k.json", "results/figures/a.png",
                "results/figures/pca.json",
                # none of these may go in:
                "data/fashion-mnist/train.gz", ".venv/bin/python", "tests/__pycache__/x.pyc", "results/.lock",
                "results/runs/j.json.bad", "results/figures/.a.png.x.tmp", "notes.txt", "old.zip"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
    _group(repo / "report", FILLED)
    with pytest.raises(cli.UserError, match="report.pdf is missing"):
        make_zip.make_zip(repo)
    shutil.copy(built[0], repo / "report" / "report.pdf")
    out = make_zip.make_zip(repo)
    assert out.name == "team-7.zip" and sorted(p.name for p in repo.glob("*.zip*")) == ["old.zip", "team-7.zip"]
    with zipfile.ZipFile(out) as zf:
        names = sorted(zf.namelist())
    expected = sorted("team-7/" + r for r in (
        "a.py", "README.md", "Makefile", "requirements.txt", "pytest.ini", ".ci/run", "report/build.py",
        "report/__init__.py", "report/report.typ", "report/references.bib", "report/group.toml", "report/report.pdf",
        "tests/test_x.py", "benchmarks/bench.py", "results/mlp_runs.csv", "results/summary.json",
        "results/manifest.json", "results/gradcheck.json", "results/cnn_recipe_sweep.jsonl",
        "results/models/mlp_best.npz", "results/models/cnn_best/backbone.pt", "results/runs/k.json",
        "results/figures/a.png", "results/figures/pca.json"))
    assert names == expected


def test_make_zip_refusals_are_one_line(tmp_path):
    bad = _group(tmp_path, "group_name = 7\n")
    for args, message in ((["--group-file", str(tmp_path / "nope.toml")], "nope.toml"),
                          (["--group-file", str(bad)], "group.toml"),
                          (["--out-dir", ""], "argument --out-dir: must not be empty")):
        result = subprocess.run([sys.executable, str(REPO / "make_zip.py"), *args], capture_output=True, text=True)
        assert result.returncode == (2 if "argument" in message else 1), result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("make_zip.py: error: ")
        assert message in result.stderr


def test_levels_over_the_multiply_add_cap_and_edges_are_named():
    stages = {"mlp_width": {"edge": False, "winner": "1024", "macs_capped": ["1536"]},
              "mlp_lr": {"edge": True, "winner": "0.009", "macs_capped": []}}
    text = build.edge_sentence({"manifest": {"stages": stages, "macs_cap": 1.1}})
    assert "Over the multiply-add cap, shown but not eligible: 1536 in the units per hidden layer." in text
    assert "learning rate (0.009)" in text
    quiet = build.edge_sentence({"manifest": {"stages": {"mlp_lr": {"edge": False, "winner": "0.001"}}}})
    assert "tried against a level on each side of it." in quiet and "cap" not in quiet


def test_fit_sentences_follow_the_gap_and_the_epoch_of_the_peak():
    assert "underfits" in build._fit_words(0.001, 0)
    assert "does not overfit noticeably" in build._fit_words(0.01, 0)
    assert "has not yet cost validation accuracy" in build._fit_words(0.05, 1)
    late = build._fit_words(0.05, 4)
    assert "peaked 4 epochs before the end" in late and "overfit" in late


def test_the_ablation_names_the_fit_cost_only_when_every_flat_removal_fits_better():
    said = build._fit_cost_sentence(0.90, [0.93, 0.95])
    assert said.startswith("Each of those removals raised training accuracy (90.00% with the full recipe, "
                           "93.00% – 95.00% without)")
    assert build._fit_cost_sentence(0.90, [0.93]).startswith("That removal raised training accuracy")
    assert build._fit_cost_sentence(0.90, [0.93, 0.89]) == ""     # one removal fits worse: no claim
    assert build._fit_cost_sentence(None, [0.93]) == build._fit_cost_sentence(0.9, [None]) == ""


def test_tracks_with_nothing_to_choose_share_one_kept_sentence():
    single = {"candidates": [{"name": "chain", "val_acc": 0.9}]}
    both = build.kept_sentence({"mlp": single, "cnn": single})
    assert both == ("For both tracks, the chain of stage winners is the hand-set default configuration, so one "
                    "candidate per track was trained at full budget.")
    two = {"kept": "default", "candidates": [{"name": "chain", "val_acc": 0.90}, {"name": "default", "val_acc": 0.91}]}
    mixed = build.kept_sentence({"mlp": single, "cnn": two})
    assert mixed.startswith("For the MLP, the chain of stage winners is the hand-set default configuration, so one "
                            "candidate was trained at full budget. For the CNN, the hand-set default reached 91.00%")


def test_the_timing_spread_of_equal_work_is_read_from_the_initialisation_stage():
    def spread(ratio):
        return build.same_work_spread({"manifest": {"stages": {"cnn_init": {"time_ratio": ratio}}}})
    assert spread({"random": 1.098, "xavier": 1.0, "he": 1.051, "random, no BN": 0.92}) == "10%"
    assert spread({"random": 1.0, "xavier": 1.0}) == spread("fast") == spread({"random": 0, "xavier": 1, "he": 1}) == ""
    assert build.same_work_spread({"manifest": {}}) == ""


def test_a_capped_level_above_the_default_is_named_in_its_stage():
    from types import SimpleNamespace
    stage = {"table": [{"variant": "1024", "val_acc": 0.875}, {"variant": "1536", "val_acc": 0.877},
                       {"variant": "2048", "val_acc": 0.870}],
             "macs_capped": ["1536", "2048"], "macs_ratio": {"1024": 1.0, "1536": 1.922, "2048": 3.3}}
    default = SimpleNamespace(raw={"default": "1024"})
    note = build.capped_note("mlp_width", stage, default)
    assert note == (" Above the default but over the multiply-add cap: 1536 (87.70%, 1.922 times the default's "
                    "multiply-adds).")
    assert build.capped_note("mlp_width", {**stage, "macs_capped": ["2048"]}, default) == ""  # below the default
    damaged = {**stage, "macs_capped": "1536", "macs_ratio": "many"}
    assert build.capped_note("mlp_width", damaged, default) == ""
    assert build.capped_note("mlp_width", {**stage, "macs_ratio": {"1536": "x"}},
                             default) == " Above the default but over the multiply-add cap: 1536 (87.70%)."


def test_the_init_caption_states_each_spread_ratio_in_words_that_fit_its_size():
    def stats(spread_bn, spread_plain):
        rows = [("cnn", s, bn, 5, std) for bn, spread in ((True, spread_bn), (False, spread_plain))
                for s, std in zip(("random", "xavier", "he"), spread)]
        return {"init": pd.DataFrame(rows, columns=["model", "scheme", "batchnorm", "layer", "act_std"])}
    even = build.init_caption(stats((0.588, 0.5881, 0.5882), (1e-5, 0.03, 1.0)))
    assert "differs 100,000-fold without BatchNorm and by less than 1% with it: BatchNorm evens out" in even
    assert "differs 3-fold without BatchNorm and by only 20% with it" in build.init_caption(
        stats((0.5, 0.55, 0.6), (0.1, 0.2, 0.3)))
    assert "does not even out" in build.init_caption(stats((0.1, 0.5, 1.0), (0.4, 0.5, 0.6)))


def test_a_stage_whose_other_levels_are_all_over_the_cap_says_so():
    stage = {"default": "x1 x1 x2 x2 x4", "contrast": ["constant", "doubling"],
             "macs_capped": ["constant", "doubling"], "macs_ratio": {"constant": 1.15, "doubling": 1.205},
             "table": [{"variant": "x1 x1 x2 x2 x4", "val_acc": 0.8982}, {"variant": "constant", "val_acc": 0.8933},
                       {"variant": "doubling", "val_acc": 0.904}]}
    said = build.only_default_sentence("cnn_filters", stage)
    assert said.startswith("Every other level is over the multiply-add cap, so the default widths ×1 ×1 ×2 ×2 ×4 "
                           "(89.82%)")
    assert "doubling (90.40%, 1.205 times the default's multiply-adds)" in said
    one_compared = {**stage, "macs_capped": ["doubling"], "contrast": ["doubling"]}
    assert build.only_default_sentence("cnn_filters", one_compared) == ""
    kept = {"kind": "only_default", "best": "widths ×1 ×1 ×2 ×2 ×4"}
    assert build._choice(kept, "filter schedule") == ("the widths ×1 ×1 ×2 ×2 ×4 filter schedule was kept, as the "
                                                       "only level within the multiply-add cap")


def test_a_summary_that_disagrees_with_its_run_records_stops_the_report(results, tmp_path, capsys):
    """An edited (or stale) summary.json would put numbers in the PDF that no run produced: the build checks
    every number it states about the finals against the final run records and refuses, naming the field."""
    d = tmp_path / "results"
    shutil.copytree(results["base"], d)
    summary = json.loads((d / "summary.json").read_text())
    true_acc = summary["mlp"]["test_acc"]
    summary["mlp"]["test_acc"] = 0.999
    (d / "summary.json").write_text(json.dumps(summary))
    assert build.main(["--results-dir", str(d), "--out", str(tmp_path / "r.pdf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("report.build: error: ") and "mlp.test_acc is 0.999" in err[-1]
    assert f"the run records give {true_acc}" in err[-1] and not (tmp_path / "r.pdf").exists()
