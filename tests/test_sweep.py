import copy
import json
import os

import pytest

from segguided_jax.sweep import Run, aggregate, evaluate_run, expand, is_finished
from segguided_jax.train import train_and_evaluate


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_expand_names_every_setting_seed_and_repeat():
    runs = expand({"seeds": [0, 1], "settings": {"a": {}, "b": {"model.gates": False}}, "repeats": 2})
    assert [r.name for r in runs] == ["a-seed0", "a-seed0-repeat1", "a-seed1", "a-seed1-repeat1",
                                      "b-seed0", "b-seed0-repeat1", "b-seed1", "b-seed1-repeat1"]
    assert runs[4].train_args() == ["--config.seed=0", "--config.model.gates=False"]


def test_sweep_runs_evaluate_and_report(tiny_config, tmp_path):
    sweep = {"seeds": [0, 1], "settings": {"gate_aux": {}, "no_gate": {"model.gates": False, "loss.aux_weight": 0.0}},
             "compare": ["gate_aux", "no_gate"]}
    runs = expand(sweep) + [Run("gate_aux", 0, (), repeat=1)]
    root = str(tmp_path)
    for run in runs:
        cfg = copy.deepcopy(tiny_config)
        cfg.seed = run.seed
        for key, value in run.overrides:
            section, field = key.split(".")
            setattr(cfg[section], field, value)
        cfg.train.steps, cfg.train.eval_every = 4, 2
        train_and_evaluate(cfg, os.path.join(root, run.name))
        assert not is_finished(root, run)
        evaluate_run(os.path.join(root, run.name))
        assert is_finished(root, run)
    # Same seed and setting: identical metrics; another seed: different ones.
    assert _rows(os.path.join(root, "gate_aux-seed0")) == _rows(os.path.join(root, "gate_aux-seed0-repeat1"))
    assert _rows(os.path.join(root, "gate_aux-seed0")) != _rows(os.path.join(root, "gate_aux-seed1"))
    result = aggregate(root, runs, ("gate_aux", "no_gate"), os.path.join(root, "report"))
    repro = {(r["setting"], r["seed"]): r["identical"] for r in result["reproducibility"]}
    assert repro[("gate_aux", 0)] is True and repro[("gate_aux", 1)] is None
    assert result["summary"]["gate_aux"]["runs"] == 3 and result["summary"]["no_gate"]["runs"] == 2
    assert result["summary"]["no_gate"]["attention_soft_dice_ed"] is None  # no gates, no maps
    assert 0 <= result["summary"]["gate_aux"]["attention_mass_inside_ed"] <= 1
    assert {t["metric"] for t in result["tests"]} == {f"{k}_{g}" for k in ("dice", "hd95") for g in ("et", "tc", "wt")}
    assert all(t["n"] == 2 for t in result["tests"])  # the two held-out cases, paired
    report = open(os.path.join(root, "report", "report.md")).read()
    assert "| gate_aux | 3 |" in report and "Paired Wilcoxon" in report
    assert os.path.getsize(os.path.join(root, "report", "curves.png")) > 1000
