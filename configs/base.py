"""The base config that every config under configs/ extends: every key a run reads, with its value
and what it does (segguided_jax/config_schema.py declares each key's type and the values that can
work, and checks a config before anything runs). The values are the demo's (configs/synthetic.py),
a small SegGuidedNet on the synthetic BraTS-like set sized for a 2-core CPU; other configs
override what differs.
"""
import ml_collections

from segguided_jax.data.augment import default_augment_config


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.dir = "data/synthetic/prepared"
    # "holdout" or "fold0" … "fold4" (segguided_jax.data.splits): training reads its train part and
    # validates on its val part; its test part is only read by sweeps and reporting.
    c.data.split = "holdout"
    # A checkpoint remembers the data fingerprint it trained on; resuming on other data fails
    # unless this is True.
    c.data.allow_fingerprint_mismatch = False
    c.data.patch = (32, 32, 32)
    # nnU-Net's oversample_foreground_percent: in every batch the last B - round(B * (1 - f)) rows
    # are centred on a voxel of a class chosen uniformly among those the case has (batch 2: one row).
    c.data.foreground_fraction = 0.5
    # The classes to choose from, each a tuple of internal labels: the sub-regions NCR, ED, ET.
    # nnU-Net's BraTS region training uses the regions instead: ((1, 2, 3), (1, 3), (3,)).
    c.data.foreground_classes = ((1,), (2,), (3,))
    # How far a uniformly placed patch may reach past each border of the case (which convert crops
    # to the brain), as a fraction of the patch edge; outside reads 0. At 0 (nnU-Net's placement)
    # only the room that rotation and scaling need is left, so without them a border voxel lies in
    # 1 of P placements along its axis against P for a central one; at 0.5 every voxel can be a
    # patch centre. On the demo at 1500 steps over 3 seeds (docs/sweep/overhang/), 0.5 changed
    # neither test Dice (0.946 +- 0.005 against 0.948 +- 0.002) nor lesion-wise WT (0.886 both).
    c.data.patch_overhang = 0.0
    # Consecutive batches cut from each group of decoded cases: reading and decoding a case is
    # paid once per this many patches (benchmarks/data_pipeline.py measures it).
    c.data.patches_per_case = 1
    # nnU-Net's augmentation without the costly resampling ones (rotation, scaling, low
    # resolution), which a 2-core CPU and a 600-step run cannot afford; brats21 turns them on.
    c.data.augment = default_augment_config()
    c.data.augment.rotation_probability = 0.0
    c.data.augment.scale_probability = 0.0
    c.data.augment.lowres_probability = 0.0
    # True: the pipeline ships, of each row's enlarged crop, the box its random draws can read, as
    # the records store it, with the draws, and the train step augments on the accelerator
    # (segguided_jax.data.device_augment.augment_boxes).
    c.data.augment_on_device = False
    # How the boxes travel with augment_on_device: "int16", the records' raw intensities (half the
    # bytes of float32; normalised on the device), or "float32", which also takes records stored
    # as float32 (intensities that are not integers, e.g. after resampling). The same patches.
    c.data.device_crop_dtype = "int16"
    # Grain worker processes; 0 = in the training process. The parameters are the same bit for bit
    # either way (the draws follow the records, not the workers). On 2 cores the demo's augmentation
    # (12 ms of CPU per batch) is cheaper in the training process than a worker's start and its
    # competition for the cores: 400 steps took 82.1 / 82.2 s without a worker against 88.8 /
    # 97.4 s with one, alternated side by side. A resume keeps the count (the data position Grain
    # saves has another structure with workers).
    c.data.num_workers = 0
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
    # The layout XLA hands cuDNN's convolutions on GPU: "default" (channels-first for 3D, with
    # transposes around each) or "channels_last" (docs/gpu.md). Other backends ignore it.
    c.model.gpu_conv_layout = "default"
    # How the blocks are computed (models/formulations.py; the values are the same whichever):
    # "auto", each backend its own forms (on TPU the folded layout), or "tpu", the TPU forms on
    # every backend (to compare them on a CPU).
    c.model.formulation = "auto"
    # The CPU-only convolution forms (a scan for the weight gradient of large, narrow 3³
    # convolutions; strided convolutions as patches and a matmul); False compiles on CPU the
    # program an accelerator gets.
    c.model.cpu_rewrites = True
    # On TPU, W folded into the channels to fill the 128 lanes (docs/tpu.md).
    c.model.tpu_fold = True
    # On TPU, residual blocks of at least this many voxels per sample run under jax.checkpoint
    # (None: none, 0: all): for patches larger than a chip's HBM holds.
    c.model.tpu_remat_min_voxels = ml_collections.config_dict.placeholder(int)

    c.loss = ml_collections.ConfigDict()
    # λ of the auxiliary attention loss; 0 turns it off. With the gate settings above, λ = 1 gave
    # slightly better maps but held-out Dice 0.61 against 0.69 at 200 steps (docs/gates.md); at the
    # demo's 1800 steps (docs/sweep/lambda, 3 seeds) λ = 1 cost nothing: test Dice 0.960 ± 0.013
    # against 0.950 ± 0.006, NCR map 0.957 against 0.920. 0.1 is the paper's value.
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
    c.optim.decay = "kernels"  # weight decay on convolution kernels only, or "all"

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 2  # global
    # On the demo's 6 test cases (one run each): 600 steps mean Dice 0.871, WT lesion-wise 0.778
    # against classic 0.793 (false-positive oedema blobs); 1200: 0.936, WT 0.799 / 0.875; 1500:
    # 0.946, 0.802 / 0.890; 1800: 0.954, 0.915 / 0.905. About 4.5 minutes of training on 2 cores.
    # Over 3 seeds, 1500 steps against 1800: mean Dice 0.948 +- 0.002 against 0.951 +- 0.005, WT
    # lesion-wise 0.886 +- 0.049 against 0.915 +- 0.001 (docs/sweep/overhang/ "inside",
    # docs/sweep/seeds/): the 50 s that 300 steps cost buy the lesion-wise figures.
    c.train.steps = 1800
    c.train.log_every = 10
    c.train.eval_every = 600
    # A run whose loop makes no progress (no step, validation case or checkpoint) for this long
    # stops with a message instead of hanging (segguided_jax/training/watchdog.py): a collective that a peer
    # never joins blocks forever otherwise. Above the slowest first step (compilation included)
    # and the slowest validation case of any config; 0: never.
    c.train.stall_timeout_s = 1800.0
    # After SIGTERM (a preemption notice to any process) the run saves at its next step; one that
    # makes no progress for this long after the notice stops without saving (schedulers send
    # SIGKILL 30-120 s after SIGTERM). 0: wait for the next step, however long.
    c.train.preempt_grace_s = 60.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices along the batch; -1: all that the spatial axis leaves
    c.mesh.spatial = 1  # devices sharing each patch (split along its first spatial axis)

    c.checkpoint = ml_collections.ConfigDict()
    # Every ~30 s of the demo's training on 2 cores: each save costs ~0.7 s there (every 50 steps,
    # 36 saves, added 26 s to the demo).
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    # A resume under another seed, model, loss, optimiser, batch size or data settings than its
    # checkpoint's stops naming the differences; True goes on from the checkpoint under the new ones.
    c.checkpoint.allow_config_change = False

    # Seconds each storage operation of a run (segguided_jax.io.storage: metrics.jsonl, config.json,
    # TensorBoard uploads, listings, copies, data staging) is retried through 429/5xx answers, resets
    # and timeouts before the run stops naming it: rides out a multi-minute Cloud Storage outage.
    c.storage = ml_collections.ConfigDict()
    c.storage.retry_secs = 600.0

    # The workdir lease (segguided_jax.training.lease): renewed every renew_secs by the run that holds it; one
    # not renewed for stale_secs is taken over by the next run (a SLURM requeue after a node died
    # waits up to this long; a kill -9 on the same host is noticed at once).
    c.lease = ml_collections.ConfigDict()
    c.lease.renew_secs = 30.0
    c.lease.stale_secs = 180.0

    c.eval = ml_collections.ConfigDict()
    c.eval.window = (32, 32, 32)
    c.eval.overlap = 0.5
    c.eval.batch_size = 8
    c.eval.threshold = 0.5
    c.eval.mirror_axes = ()  # validation during training: one pass (predict and sweeps mirror all 8 ways)
    # ET below min_et_voxels becomes NCR: per connected component ("component"), or all of it when the
    # case's whole ET is that small ("case", nnU-Net's BraTS rule). A speck of ET in a case without
    # any costs that case's ET Dice entirely (BraTS scores it 0); 10 voxels ~ 150 mm³ at 2.5 mm.
    c.eval.et_rule = "component"
    c.eval.min_et_voxels = 10
    c.eval.max_cases = 0  # 0: every held-out case
    # The minimum component volume per region (WT, TC, ET) is learned at the end of training on the
    # val cases' lesion-wise Dice (segguided_jax.inference.postprocess.choose): among these candidates (mm³),
    # by this rule among those that tie ("plateau_middle", "smallest", "largest"), no lower than
    # the floor where the val cases cannot decide (BraTS does not count lesions <= 50 mm³).
    # Measured over seeds and on multifocal 1 mm cases: docs/postprocessing.md.
    c.eval.postprocess_candidates_mm3 = (0, 10, 25, 50, 100, 250, 500, 1000, 2500)
    c.eval.postprocess_rule = "plateau_middle"
    c.eval.postprocess_floor_mm3 = 50.0
    return c
