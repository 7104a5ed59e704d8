"""SegGuidedNet on BraTS2021 at the paper's scale (128³ patches, widths 32…320, bf16), for accelerators.

    python -m data_prep.convert --src /path/to/BraTS2021_TrainingData --out data/brats21/prepared \
        --test-cases 251 --val-fraction 0.2   # the paper's 251 held out; val drawn from the other 1,000
    python -m segguided_jax.train --config=configs/brats21.py --workdir=runs/brats21 \
        [--config.data.dir=/path/to/prepared]
"""
from configs import base
from configs.synthetic import get_sweep  # noqa: F401  (the same ablation and λ sweeps)
from segguided_jax.data.augment import default_augment_config


def get_config():
    c = base.get_config()
    c.data.dir = "data/brats21/prepared"
    c.data.patch = (128, 128, 128)
    c.data.foreground_fraction = 0.33  # nnU-Net's oversample_foreground_percent (batch 2: the last row)
    c.data.augment = default_augment_config()  # all of nnU-Net's, at its probabilities
    # Each decoded full-size case gives 4 patches (in 4 consecutive batches; each batch still holds
    # B different cases): reading and decoding a 240 x 240 x 155 case costs about as much as
    # augmenting a patch (benchmarks/data_pipeline.py prints the figures).
    c.data.patches_per_case = 4
    c.data.num_workers = 8
    c.data.read_threads = 4
    c.data.prefetch = 1  # in groups of patches_per_case batches: 4 batches ahead, as before

    c.model.widths = (32, 64, 128, 256, 320)
    c.model.encoder_blocks = (1, 2, 2, 2, 2)
    c.model.decoder_blocks = (1, 1, 1, 1)
    c.model.down_kernel = 3
    # On an H100 (jax 0.11.2, bf16, batch 2 x 128³) a step took 73 ms with resize + 1³ conv and
    # 595 ms with a transposed conv, whose 3D gradients XLA handles poorly on GPU.
    c.model.upsample = "resize"
    c.model.compute_dtype = "bfloat16"  # parameters stay float32

    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 500
    c.optim.sgdr_first_cycle_steps = 10_000
    c.optim.sgdr_cycle_mult = 2.0

    c.train.batch_size = 2
    c.train.steps = 150_000
    c.train.log_every = 50
    c.train.eval_every = 5_000

    c.checkpoint.every_steps = 1_000
    c.checkpoint.keep = 3

    c.eval.window = (128, 128, 128)
    c.eval.batch_size = 2
    c.eval.min_et_voxels = 0  # the paper names no post-processing
    return c
