"""SegGuidedNet on BraTS2023-GLI at the paper's scale; the same recipe as brats21.

    python -m data_prep.convert --src /path/to/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData --out data/brats23/prepared \
        --test-cases 251
    python -m segguided_jax.train --config=configs/brats23.py --workdir=runs/brats23
"""
from configs import brats21
from configs.brats21 import get_sweep  # noqa: F401  (the same ablation and λ sweeps)


def get_config():
    c = brats21.get_config()
    c.data.dir = "data/brats23/prepared"
    return c
