"""The demo: a small SegGuidedNet on the synthetic BraTS-like set, sized for a 2-core CPU.

    python -m data_prep.synthetic --out data/synthetic/raw --cases 30 --edition 2021 --seed 0 --shape 96 96 64
    python -m data_prep.convert --src data/synthetic/raw --out data/synthetic/prepared
    python -m segguided_jax.train --config=configs/synthetic.py --workdir=runs/synthetic
"""
from configs import base


def get_config():
    return base.get_config()  # the base's values are the demo's


def get_sweep(name: str = "ablation"):
    """The experiments the paper lacks, over 3 seeds (run with launch/sweep.py --sweep=NAME):
    "ablation": gates with the auxiliary loss (λ from the config) against gates with λ = 0 (the
    maps are then free features) and no gates at all; "lambda": the auxiliary weight λ; "overhang":
    patches that may reach past the case's borders (data.patch_overhang) against the config's;
    "seeds": the config itself (the README's demo figures as mean ± sd)."""
    seeds = [0, 1, 2]
    sweeps = {
        "ablation": {"seeds": seeds,
                     # Without the auxiliary loss the maps are free features, so the segmentation
                     # gradient reaches them (no stop-gradient): the paper's gate with λ = 0.
                     "settings": {"gate_aux": {},
                                  "gate_no_aux": {"loss.aux_weight": 0.0, "model.gate_stop_gradient": False},
                                  "no_gate": {"model.gates": False, "loss.aux_weight": 0.0}},
                     "compare": [["gate_aux", "no_gate"], ["gate_aux", "gate_no_aux"]]},
        "lambda": {"seeds": seeds,
                   "settings": {f"aux{w:g}": {"loss.aux_weight": w} for w in (0.03, 0.1, 0.3, 1.0)},
                   "sensitivity": "loss.aux_weight"},
        # Patches that may reach half their edge past the case's borders against patches kept
        # inside it (the config: nnU-Net's placement, which without rotation or scaling leaves no
        # room past the borders). docs/sweep/overhang/ ran it with -- --config.train.steps=1500.
        "overhang": {"seeds": seeds,
                     "settings": {"overhang": {"data.patch_overhang": 0.5}, "inside": {}},
                     "compare": [["overhang", "inside"]]},
        # The config as it is, over the seeds: the spread behind a single run's figures.
        "seeds": {"seeds": seeds, "settings": {"config": {}}},
    }
    return sweeps[name]
