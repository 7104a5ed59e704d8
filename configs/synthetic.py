"""The demo: a small SegGuidedNet on the synthetic BraTS-like set, sized for a 2-core CPU.

    python -m data_prep.synthetic --out data/synthetic/raw --cases 30 --edition 2021 --seed 0 --shape 96 96 64
    python -m data_prep.convert --src data/synthetic/raw --out data/synthetic/prepared
    python -m segguided_jax.train --config=configs/synthetic.py --workdir=runs/synthetic
"""
import ml_collections

from segguided_jax.data.augment import default_augment_config


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.dir = "data/synthetic/prepared"
    c.data.split = "holdout"  # or "fold0" … "fold4" (data_prep.splits)
    # A checkpoint remembers the data fingerprint it trained on; resuming on other data fails
    # unless this is True.
    c.data.allow_fingerprint_mismatch = False
    c.data.patch = (32, 32, 32)
    c.data.foreground_fraction = 0.5  # share of patches centred on a tumour voxel
    # nnU-Net's augmentation without the costly resampling ones (rotation, scaling, low
    # resolution), which a 2-core CPU and a 600-step run cannot afford; brats21 turns them on.
    c.data.augment = default_augment_config()
    c.data.augment.rotation_probability = 0.0
    c.data.augment.scale_probability = 0.0
    c.data.augment.lowres_probability = 0.0
    c.data.num_workers = 0  # Grain worker processes; 0 = in the training process
    c.data.read_threads = 1
    c.data.prefetch = 2

    c.model = ml_collections.ConfigDict()
    c.model.in_channels = 4
    c.model.widths = (8, 16, 32, 64)
    c.model.encoder_blocks = (1, 1, 1, 1)
    c.model.decoder_blocks = (1, 1, 1)
    c.model.down_kernel = 2  # 2³ stride-2 downsampling is far cheaper than 3³ on CPU
    c.model.upsample = "transpose"  # or "resize"
    c.model.gates = True  # False removes the SegAttentionGates (the ablation)
    c.model.num_maps = 3  # NCR, ED, ET
    # Why and by how much, measured at this config: docs/gates.md.
    # The maps learn from the auxiliary loss only; with the segmentation gradient on them, the ET
    # map lit the tumour core (600 steps) or the whole brain (200 steps, logit scale 10).
    c.model.gate_stop_gradient = True
    # The map conv's learning-rate multiplier: at 1 the NCR and ET maps kept a floor of ~0.03 over
    # the healthy brain after 600 steps (soft Dice 0.015 / 0.175); at 10 they reach 0.81 / 0.88.
    c.model.gate_logit_scale = 10.0
    c.model.output = "regions"  # sigmoid ET/TC/WT, or "labels" for softmax over 0..3
    c.model.leaky_slope = 0.01
    c.model.compute_dtype = "float32"

    c.loss = ml_collections.ConfigDict()
    # λ of the auxiliary attention loss; 0 turns it off. With the gate settings above, λ = 1 gave
    # slightly better maps but held-out Dice 0.61 against 0.69 at 200 steps (docs/gates.md).
    c.loss.aux_weight = 0.1
    # None: halving per stage away from full resolution; uniform (1, 1, 1) was no better (docs/gates.md).
    c.loss.aux_stage_weights = ml_collections.config_dict.placeholder(tuple)
    # "batch", "sample" or "present" (losses.aux_dice_loss). Here a sub-region is missing from
    # 0.3 % (NCR) and 6 % (ET) of batches, and "present" changed nothing on a fixed batch.
    c.loss.aux_dice = "batch"
    c.loss.batch_dice = True
    c.loss.dice_smooth = 1e-5

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 3e-3
    c.optim.weight_decay = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.grad_clip_norm = 12.0
    c.optim.warmup_steps = 20
    c.optim.sgdr_first_cycle_steps = 0  # 0: one cosine cycle over the whole run
    c.optim.sgdr_cycle_mult = 2.0
    c.optim.min_lr_ratio = 0.01

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 2  # global
    c.train.steps = 600
    c.train.log_every = 10
    c.train.eval_every = 200

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices along the batch; -1: all that the spatial axis leaves
    c.mesh.spatial = 1  # devices sharing each patch (split along its first spatial axis)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.eval = ml_collections.ConfigDict()
    c.eval.window = (32, 32, 32)
    c.eval.overlap = 0.5
    c.eval.batch_size = 8
    c.eval.threshold = 0.5
    # ET components smaller than this become NCR (0: off). A speck of ET in a case without any
    # costs that case's ET Dice entirely (BraTS scores it 0); ~150 mm³ at the demo's 2.5 mm voxels.
    c.eval.min_et_voxels = 10
    c.eval.max_cases = 0  # 0: every held-out case
    return c


def get_sweep():
    """The paper's missing experiment: 3 seeds, SegAttentionGates with the auxiliary loss (λ from
    the config) against no gates. Run with launch/sweep.py."""
    return {"seeds": [0, 1, 2],
            "settings": {"gate_aux": {}, "no_gate": {"model.gates": False, "loss.aux_weight": 0.0}},
            "compare": ["gate_aux", "no_gate"], "repeats": 1}
