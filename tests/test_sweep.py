import copy
import json
import os


from segguided_jax.experiments.sweep import Run, aggregate, evaluate_run, expand, is_finished
from segguided_jax.training.loop import train_and_evaluate


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
    # gate_aux over both seeds and a repeat of seed 0 (the seed and reproducibility checks);
    # no_gate on seed 0 only: the comparison pairs the settings case by case.
    runs = [r for r in expand(sweep) if r.name != "no_gate-seed1"] + [Run("gate_aux", 0, (), repeat=1)]
    root = str(tmp_path)
    for run in runs:
        cfg = copy.deepcopy(tiny_config)
        cfg.seed = run.seed
        for key, value in run.overrides:
            section, field = key.split(".")
            setattr(cfg[section], field, value)
        # One validation, at the last step and on one val case (it makes best/ and the learned
        # post-processing): the report is made of the held-out scores (evaluate_run, both test
        # cases) and of metrics.jsonl; more validations only add sliding-window passes.
        cfg.train.steps, cfg.train.eval_every, cfg.eval.max_cases = 4, 4, 1
        train_and_evaluate(cfg, os.path.join(root, run.name))
        assert not is_finished(root, run)
        evaluate_run(os.path.join(root, run.name))
        assert is_finished(root, run)
    # Same seed and setting: identical metrics; another seed: different ones.
    assert _rows(os.path.join(root, "gate_aux-seed0")) == _rows(os.path.join(root, "gate_aux-seed0-repeat1"))
    assert _rows(os.path.join(root, "gate_aux-seed0")) != _rows(os.path.join(root, "gate_aux-seed1"))
    result = aggregate(root, runs, os.path.join(root, "report"), ("gate_aux", "no_gate"))
    repro = {(r["setting"], r["seed"]): r["identical"] for r in result["reproducibility"]}
    assert repro[("gate_aux", 0)] is True and repro[("gate_aux", 1)] is None
    assert result["summary"]["gate_aux"]["runs"] == 3 and result["summary"]["no_gate"]["runs"] == 1
    assert result["summary"]["no_gate"]["attention_soft_dice_ed"] is None  # no gates, no maps
    assert 0 <= result["summary"]["gate_aux"]["attention_mass_inside_ed"] <= 1
    assert {t["metric"] for t in result["tests"]} == {f"{k}_{g}" for k in ("dice", "hd95") for g in ("et", "tc", "wt")}
    assert all(t["n"] == 2 for t in result["tests"])  # the two held-out cases, paired
    report = open(os.path.join(root, "report", "report.md")).read()
    assert "| gate_aux | 3 |" in report and "Paired Wilcoxon" in report and "Attention fidelity" in report
    assert os.path.getsize(os.path.join(root, "report", "curves.png")) > 1000


def test_sweeps_of_every_config_expand_and_apply(tiny_config):
    """Every named sweep of every config expands, and each override names a config field."""
    import importlib

    for name in ("synthetic", "brats21", "brats23"):
        module = importlib.import_module(f"configs.{name}")
        config = module.get_config()
        for sweep_name in ("ablation", "lambda", "seeds") + (("overhang",) if name == "synthetic" else ()):
            runs = expand(module.get_sweep(sweep_name))
            assert len(runs) == 3 * len(module.get_sweep(sweep_name)["settings"])
            for run in runs:
                for key, _ in run.overrides:
                    section, field = key.split(".")
                    assert field in config[section], (name, sweep_name, key)
    ablation = {r.setting for r in expand(importlib.import_module("configs.synthetic").get_sweep("ablation"))}
    assert ablation == {"gate_aux", "gate_no_aux", "no_gate"}


def test_sensitivity_table_orders_by_the_varied_value(tmp_path):
    from segguided_jax.evaluation.evaluate import write_per_case

    runs = [Run(f"aux{w:g}", seed, (("loss.aux_weight", w),)) for w in (0.3, 0.03) for seed in (0, 1)]
    for i, run in enumerate(runs):
        os.makedirs(tmp_path / run.name / "heldout")
        with open(tmp_path / run.name / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"step": 4, "split": "val", "dice_mean": 0.5}) + "\n")
        rows = [{"case_id": f"c{c}", "status": "ok", **{f"{k}_{g}": 0.1 * (i + c + 1) for k in ("dice", "hd95", "lesion_dice")
                                                         for g in ("et", "tc", "wt")},
                 "attention_soft_dice_ncr": 0.2 * (i + 1)} for c in range(3)]
        write_per_case(str(tmp_path / run.name / "heldout" / "per_case.csv"), rows)
    result = aggregate(str(tmp_path), runs, str(tmp_path / "report"), sensitivity="loss.aux_weight")
    assert result["sensitivity"]["values"] == {"aux0.3": 0.3, "aux0.03": 0.03}
    report = open(tmp_path / "report" / "report.md").read()
    table = report.split("Sensitivity to `loss.aux_weight`")[1]
    assert table.index("| 0.03 |") < table.index("| 0.3 |")  # ascending λ
    # aux0.03's runs are the 3rd and 4th (i = 2, 3): NCR fidelity 0.6 and 0.8 -> 0.700 ± 0.141
    assert "0.700 ± 0.141" in table.split("| 0.03 |")[1].split("\n")[0]
