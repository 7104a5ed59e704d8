import hashlib
import json
import os

import nibabel as nib
import numpy as np
import pytest

from data_prep import synthetic
from segguided_jax.data import records as records_lib
from segguided_jax.data import splits as splits_lib
from segguided_jax.data.brats import EDITIONS, MODALITIES, labels_to_regions, regions_to_labels
from segguided_jax.data.pipeline import train_dataset
from segguided_jax.data.transforms import enlarged_start, final_start, foreground_rows, outside_fraction
from segguided_jax.evaluation.metrics import lesion_wise

SHAPE = (40, 40, 26)


def _read(path):
    return np.asanyarray(nib.load(path).dataobj)


def test_synthetic_same_seed_same_bytes_and_layout(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        synthetic.write_case(str(out), "2023", 7, seed=11, shape=SHAPE)
    case = "BraTS-GLI-00007-000"
    names = sorted(os.listdir(a / case))
    assert names == sorted(f"{case}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg"))
    for n in names:
        assert (a / case / n).read_bytes() == (b / case / n).read_bytes()
    synthetic.write_case(str(tmp_path / "c"), "2023", 7, seed=12, shape=SHAPE)
    assert (tmp_path / "c" / case / f"{case}-t1c.nii.gz").read_bytes() != (a / case / f"{case}-t1c.nii.gz").read_bytes()


def test_synthetic_single_tumour_cases_did_not_move_with_the_lesions_option():
    images, labels, _ = synthetic.synth_case(np.random.default_rng(0), SHAPE)
    # This case's bytes before --lesions existed: the demo's data, and so its figures, stay put.
    assert hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16] == "91c18b5ab337db0c"


def test_synthetic_multifocal_cases_hold_separate_lesions():
    """--lesions 3: the main tumour and two satellites, apart (26-connected) and, at 2.5 mm, far
    enough apart to stay separate lesions under BraTS's grouping (3 dilations) in most cases."""
    from scipy import ndimage

    groups = []
    for seed in range(4):
        _, labels, spacing = synthetic.synth_case(np.random.default_rng(seed), (96, 96, 62), lesions=3)
        assert ndimage.label(labels > 0, np.ones((3, 3, 3)))[1] == 3, seed
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
        groups.append(len(lesion_wise(labels > 0, labels > 0, spacing)["lesions"]))
    assert groups == [3, 2, 1, 3], groups


def test_synthetic_anatomy_follows_brats(raw_dir):
    edition = EDITIONS["2021"]
    cases = sorted(os.listdir(raw_dir))
    without_et = 0
    for case in cases:
        d = os.path.join(raw_dir, case)
        seg = _read(edition.seg_file(d))
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
        assert (seg > 0).any()
        files = edition.modality_files(d)
        imgs = {m: _read(files[m]).astype(np.float32) for m in MODALITIES}
        brain = imgs["t1"] != 0
        assert (seg[~brain] == 0).all()  # tumour lies inside the skull-stripped brain
        wm_like = brain & (seg == 0)
        if (seg == 4).any():
            # ET enhances on T1ce relative to the necrotic core and normal tissue.
            assert imgs["t1ce"][seg == 4].mean() > imgs["t1ce"][wm_like].mean()
            if (seg == 1).any():
                assert imgs["t1ce"][seg == 4].mean() > 1.5 * imgs["t1ce"][seg == 1].mean()
        else:
            without_et += 1
        # Oedema is bright on FLAIR.
        assert imgs["flair"][seg == 2].mean() > 1.3 * imgs["flair"][wm_like].mean()
    assert 0 < without_et < len(cases)


# --- records ---

def _write_prepared(folder, cases, *, records=None):
    """A prepared folder by hand: cases [(case_id, image, label)] -> one shard, manifest, splits
    (all cases in the holdout's train part). records: the record bytes to write instead."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(folder)
    shard = "cases-00000-of-00001.array_record"
    writer = ArrayRecordWriter(os.path.join(folder, shard), "group_size:1")
    entries = []
    for r, (case_id, image, label) in enumerate(cases):
        writer.write(records_lib.encode_case(case_id, image, label) if records is None else records[r])
        entries.append({"id": case_id, "record": r, "shard": shard, "has_label": True, "shape": list(label.shape)})
    writer.close()
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"version": records_lib.MANIFEST_VERSION, "shards": [shard], "cases": entries,
                   "fingerprint": "0" * 64}, f)
    with open(os.path.join(folder, "splits.json"), "w") as f:
        json.dump({"version": splits_lib.SPLITS_VERSION,
                   "holdout": {"train": [c[0] for c in cases], "val": [], "test": []}}, f)
    return folder


def _zscored(raw, brain):
    """segguided_jax.data.preprocess's normalisation of raw (X, Y, Z, C) float32 integer values."""
    out = np.zeros(raw.shape, np.float32)
    norm = []
    for c in range(raw.shape[-1]):
        vals = raw[..., c][brain].astype(np.float64)
        mean, std = float(vals.mean()), float(vals.std())
        out[..., c] = np.where(brain, (raw[..., c] - mean) / max(std, 1e-8), 0)
        norm.append([mean, std])
    return out, norm


def test_records_round_trip_int16_exact_or_float32():
    rng = np.random.default_rng(0)
    brain = np.zeros((12, 14, 10), bool)
    brain[2:10, 3:12, 1:9] = True
    raw = np.where(brain[..., None], rng.integers(1, 3000, (12, 14, 10, 4)), 0).astype(np.float32)
    image, norm = _zscored(raw, brain)
    label = np.zeros(brain.shape, np.uint8)
    label[4:6, 5:8, 3:5] = 3
    # with the statistics the image is stored as int16 and decodes bit for bit
    record = records_lib.encode_case("c1", image, label, norm=norm)
    case = records_lib.read_case(record)
    assert case.stored_dtype == "int16" and case.case_id == "c1" and case.shape == (12, 14, 10)
    assert np.array_equal(case.image().view(np.uint32), image.view(np.uint32))
    boxes = case.channel_boxes((1, 2, 3), (9, 10, 7))
    for c in range(4):
        assert np.array_equal(boxes[c].view(np.uint32), image[1:9, 2:10, 3:7, c].view(np.uint32))
    assert len(record) < 0.6 * len(records_lib.encode_case("c1", image, label))
    # without them, or when the intensities are not integers (resampled), float32
    assert records_lib.read_case(records_lib.encode_case("c1", image, label)).stored_dtype == "float32"
    resampled, norm2 = _zscored(raw + 0.25 * brain[..., None], brain)
    case = records_lib.read_case(records_lib.encode_case("c1", resampled, label, norm=norm2))
    assert case.stored_dtype == "float32" and np.array_equal(case.image(), resampled)
    # the decoded dict, as validation uses it: writable copies
    decoded = records_lib.decode_case(record)
    assert decoded["image"].flags.writeable and np.array_equal(decoded["label"], label)


def test_foreground_locations_follow_nnunet_sampling():
    label = np.zeros((40, 40, 20), np.uint8)
    label[:25, :24] = 2  # 12,000 voxels: nnU-Net keeps a sample of 10,000
    label[30:32, 30:33, 5] = 1  # 6 voxels: all of them
    fg = records_lib.foreground_locations(label)
    assert [len(c) for c in fg.coords] == [6, 10_000, 0] and fg.totals.tolist() == [6, 12_000, 0]
    ed = fg.coords[1].astype(int)
    assert (label[ed[:, 0], ed[:, 1], ed[:, 2]] == 2).all() and len(np.unique(ed, axis=0)) == 10_000
    assert fg.present(((1,), (2,), (3,))) == [0, 1] and fg.present(((1, 2, 3), (1, 3), (3,))) == [0, 1]
    again = records_lib.foreground_locations(label)
    assert all(np.array_equal(a, b) for a, b in zip(fg.coords, again.coords))  # reproducible


def test_format_1_records_still_read_and_bad_bytes_name_the_case(tmp_path):
    import io

    label = np.zeros((20, 20, 20), np.uint8)
    label[5:8, 5:8, 5:8] = 2
    image = np.random.default_rng(0).standard_normal((20, 20, 20, 4)).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, image=image, case_id=np.array("old"), label=label)  # the format before format 2
    folder = _write_prepared(str(tmp_path / "old"), [("old", image, label)], records=[buf.getvalue()])
    source = records_lib.CaseSource(folder, "train")
    case = source.case(0)
    assert case.stored_dtype == "float32" and np.array_equal(case.image(), image)
    assert case.foreground.totals.tolist() == [0, 27, 0]  # computed on decode
    assert np.array_equal(source[0]["label"], label)
    folder = _write_prepared(str(tmp_path / "bad"), [("broken", image, label)], records=[b"not a record at all"])
    with pytest.raises(ValueError, match="case broken.*data_prep.convert"):
        records_lib.CaseSource(folder, "train").case(0)


# --- patch placement and sampling ---

def test_foreground_rows_are_nnunets_last_rows():
    assert [foreground_rows(b, 0.33) for b in (1, 2, 3, 4, 8)] == [0, 1, 1, 1, 3]
    assert foreground_rows(4, 0.0) == 0 and foreground_rows(4, 1.0) == 4


def test_placement_reaches_every_border_and_centres_small_cases():
    rng = np.random.default_rng(0)
    starts = np.array([final_start(enlarged_start((40, 30, 10), (16, 16, 16), (24, 24, 16), rng), (16, 16, 16),
                                   (24, 24, 16)) for _ in range(3000)])
    # need_to_pad room: the final patch's start is uniform over [0, shape - patch] ...
    assert set(starts[:, 0]) == set(range(0, 25)) and set(starts[:, 1]) == set(range(0, 15))
    assert set(starts[:, 2]) == {-3}  # ... and a case smaller than the patch sits in its middle
    # a forced voxel is centred, clipped to the same range on both sides
    for voxel, expected in (((20, 15, 5), (12, 7, -3)), ((0, 0, 0), (0, 0, -3)), ((39, 29, 9), (24, 14, -3))):
        start = final_start(enlarged_start((40, 30, 10), (16, 16, 16), (24, 24, 16), rng, voxel), (16, 16, 16),
                            (24, 24, 16))
        assert tuple(start) == expected
        assert all(s <= v < s + 16 for s, v in zip(start, voxel))


def test_overhang_lets_every_voxel_be_a_patch_centre():
    """data.patch_overhang 0.5: the final patch may reach half its edge past each border, so uniform
    placement makes every voxel of the case a possible patch centre (at 0 a border voxel lies in
    1 of P placements along its axis); the rotation's own room still counts where it is larger."""
    rng = np.random.default_rng(0)
    shape, patch = (40, 30, 10), (16, 16, 16)
    starts = np.array([final_start(enlarged_start(shape, patch, patch, rng, overhang=(8, 8, 8)), patch, patch)
                       for _ in range(4000)])
    assert set(starts[:, 0]) == set(range(-8, 33)) and set(starts[:, 1]) == set(range(-8, 23))
    assert set(starts[:, 2]) == set(range(-8, 3))  # smaller than the patch: any voxel a centre too
    centres = starts + 8
    assert [(c.min(), c.max()) for c in centres.T] == [(0, 40), (0, 30), (0, 10)]
    # a larger enlarged box keeps its own room (nnU-Net's need_to_pad), the overhang adds none
    wide = np.array([final_start(enlarged_start(shape, patch, (24, 24, 16), rng, overhang=(2, 2, 2)), patch,
                                 (24, 24, 16)) for _ in range(3000)])
    assert set(wide[:, 0]) == set(range(0, 25))


def test_the_pipeline_places_patches_past_the_border_only_with_an_overhang(tiny_config):
    """Through train_dataset, which the train command reads its batches from: with
    data.patch_overhang 0.5 some patches reach past the case (whole faces of zeros in every
    channel, no label there); with 0 none do (the cropped brain touches every face of its box)."""
    def outside_faces(overhang):
        cfg = tiny_config
        cfg.data.patch_overhang = overhang
        cfg.data.foreground_fraction = 0.0
        for key in cfg.data.augment:  # no rotation, scaling or intensity draws: zeros stay zeros
            if key.endswith("probability") and key != "mirror_probability":
                cfg.data.augment[key] = 0.0
        it = iter(train_dataset(cfg.data.dir, cfg.data, seed=0, batch_size=2))
        faces = 0
        for _ in range(30):
            image = next(it)["image"]
            for row in image:
                for axis in range(3):
                    for end in (0, -1):
                        face = np.take(row, end, axis=axis)
                        faces += bool(np.all(face == 0))
        return faces

    assert outside_faces(0.0) == 0
    assert outside_faces(0.5) >= 10


def test_brats21_augmentation_reads_outside_the_original_grid_under_1_percent():
    """With configs/brats21.py (128³ patches, its rotation and scaling), on full-size cases (brain
    boxes and crop boxes of six synthetic 240 x 240 x 155 cases), the share of patch voxels whose
    source lies outside the original image grid stays under 1 %; the final-size crop rotated and
    scaled in place, as before, reads outside itself for several percent."""
    from configs import brats21
    from segguided_jax.data.augment import draw_spatial, initial_patch_size

    data_cfg = brats21.get_config().data
    patch = tuple(data_cfg.patch)
    initial = initial_patch_size(patch, data_cfg.augment)
    boxes = [[[44, 185], [44, 202], [35, 140]], [[51, 194], [31, 201], [16, 143]], [[55, 182], [34, 201], [22, 142]],
             [[45, 193], [31, 208], [30, 142]], [[46, 194], [42, 201], [25, 139]], [[53, 186], [34, 202], [28, 141]]]
    rng = np.random.default_rng(0)
    half = (np.asarray(patch) - 1) / 2
    grid, before = [], []
    for k in range(300):
        box = np.asarray(boxes[k % len(boxes)])
        shape = box[:, 1] - box[:, 0]
        start = final_start(enlarged_start(shape, patch, initial, rng), patch, initial)
        matrix = draw_spatial(rng, data_cfg.augment)
        grid.append(outside_fraction((240, 240, 155), matrix, start + half + box[:, 0], patch, step=8))
        before.append(outside_fraction(patch, matrix, half, patch, step=8))
    assert np.mean(grid) < 0.01
    assert np.mean(before) > 0.05


# --- the Grain pipeline ---

def test_pipeline_batches_and_resumes_exactly(tiny_config):
    cfg = tiny_config
    cfg.data.patches_per_case = 2
    ds = train_dataset(cfg.data.dir, cfg.data, seed=0, batch_size=2)
    it = iter(ds)
    first = [next(it) for _ in range(3)]
    b = first[0]
    assert b["image"].shape == (2, 16, 16, 16, 4) and b["image"].dtype == np.float32
    assert b["label"].shape == (2, 16, 16, 16) and b["label"].dtype == np.uint8
    assert b["case_id"].shape == (2,) and b["case_id"][0] != b["case_id"][1]  # two cases per batch
    assert list(first[1]["case_id"]) == list(b["case_id"])  # the second patch of each decoded case
    assert not np.array_equal(first[1]["image"], b["image"])
    state = it.get_state()  # in the middle of a group
    expected = [next(it) for _ in range(4)]
    it2 = iter(train_dataset(cfg.data.dir, cfg.data, seed=0, batch_size=2))
    it2.set_state(json.loads(json.dumps(state)))  # the state survives JSON, as in a checkpoint
    for e in expected:
        got = next(it2)
        assert np.array_equal(got["image"], e["image"]) and np.array_equal(got["label"], e["label"])
        assert list(got["case_id"]) == list(e["case_id"])
    other = next(iter(train_dataset(cfg.data.dir, cfg.data, seed=1, batch_size=2)))
    assert not np.array_equal(other["image"], first[0]["image"])


def test_foreground_fraction_one_always_hits_tumour(tiny_config):
    cfg = tiny_config
    cfg.data.foreground_fraction = 1.0
    it = iter(train_dataset(cfg.data.dir, cfg.data, seed=0, batch_size=2))
    for _ in range(4):
        assert all((lab > 0).any() for lab in next(it)["label"])


def _blob_case(with_ed: bool):
    """(80, 20, 20): NCR at x 2..4, ED at x 36..42 (the most voxels), ET at x 74..76, y and z 8..11.
    The blobs lie 30+ voxels apart, so a 16³ patch holds at most one of them."""
    label = np.zeros((80, 20, 20), np.uint8)
    label[2:5, 8:12, 8:12] = 1
    if with_ed:
        label[36:43, 8:12, 8:12] = 2
    label[74:77, 8:12, 8:12] = 3
    image = np.repeat(label[..., None], 4, axis=-1).astype(np.float32)
    return image, label


def test_foreground_oversampling_shares_over_2000_batches(tmp_path, tiny_config):
    """Batch 2, foreground_fraction 0.33: nnU-Net forces the last 2 - round(1.34) = 1 row.
    Expected shares of patches containing each sub-region, 16³ patches placed along x in [0, 64]:
      forced row, case with NCR, ED, ET: 1/3 each (class uniform, not voxel-weighted: ED has
        7/13 of the voxels); case with NCR and ET only: 1/2, 0, 1/2;
      other row (uniform start): NCR 5/65 = 0.077, ED 22/65 = 0.338 (0 without ED), ET 6/65 = 0.092.
    """
    # 64 cases, as Grain's index shuffle is slow on a handful (~20 ms per element for 2 to 4)
    cases = [(f"{kind}_{i:02d}", *_blob_case(kind == "all3")) for kind in ("all3", "no_ed") for i in range(32)]
    folder = _write_prepared(str(tmp_path / "blobs"), cases)
    cfg = tiny_config.data
    cfg.dir = folder
    cfg.foreground_fraction = 0.33
    cfg.patches_per_case = 4
    for key in list(cfg.augment.keys()):
        if key.endswith("_probability"):
            cfg.augment[key] = 0.0
    cfg.augment.mirror_probability = 0.5  # flips change no patch's content
    it = iter(train_dataset(folder, cfg, seed=0, batch_size=2))
    counts = {}
    for _ in range(2000):
        batch = next(it)
        for row in range(2):
            key = ("forced" if row == 1 else "random", str(batch["case_id"][row]).rsplit("_", 1)[0])
            hits = [(batch["label"][row] == c).any() for c in (1, 2, 3)]
            counts.setdefault(key, []).append(hits)
    shares = {k: np.mean(v, axis=0) for k, v in counts.items()}
    expected = {("forced", "all3"): [1 / 3, 1 / 3, 1 / 3], ("forced", "no_ed"): [0.5, 0.0, 0.5],
                ("random", "all3"): [5 / 65, 22 / 65, 6 / 65], ("random", "no_ed"): [5 / 65, 0.0, 6 / 65]}
    assert set(shares) == set(expected)
    for key, want in expected.items():
        assert len(counts[key]) > 800  # each kind of case about half the rows
        np.testing.assert_allclose(shares[key], want, atol=0.05, err_msg=str(key))
    # every forced row holds exactly one sub-region: its centre voxel's
    assert all(sum(h) == 1 for k, v in counts.items() if k[0] == "forced" for h in v)


def test_region_label_conversions_are_inverse():
    labels = np.array([0, 1, 2, 3], np.uint8)
    regions = labels_to_regions(labels)
    assert regions.tolist() == [[0, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert regions_to_labels(regions).tolist() == [0, 1, 2, 3]


def test_synthetic_command_writes_multifocal_cases_and_refuses_zero_lesions(tmp_path):
    """`python -m data_prep.synthetic --lesions 3`, as users run it: the case's segmentation holds
    separate tumours; --lesions 0 is refused with a message naming the flag."""
    import subprocess
    import sys

    from scipy import ndimage

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "data_prep.synthetic", "--out", str(tmp_path / "raw"), "--cases", "1",
           "--edition", "2023", "--seed", "0", "--shape", "96", "96", "62"]
    out = subprocess.run(cmd + ["--lesions", "3"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    seg = _read(str(tmp_path / "raw" / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz"))
    assert ndimage.label(seg > 0, np.ones((3, 3, 3)))[1] == 3
    bad = subprocess.run(cmd + ["--lesions", "0"], cwd=root, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--lesions must be at least 1" in bad.stderr


def test_synthetic_command_bias_scale_changes_only_the_bias_fields(tmp_path):
    """`python -m data_prep.synthetic --bias-scale 0`: the same case (labels byte for byte) without
    its bias fields. Each modality of the original is the unbiased one times exp(0.15 f), f a smooth
    field in about [-1, 1]: the ratio stays within exp(+-0.3), varies, and --bias-scale 2 gives its
    square (up to the noise)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    case = "BraTS2021_00000"
    images, segs = {}, {}
    for scale in ("1", "0", "2"):
        out = tmp_path / scale
        cmd = [sys.executable, "-m", "data_prep.synthetic", "--out", str(out), "--cases", "1", "--seed", "3",
               "--shape", *map(str, SHAPE), "--bias-scale", scale]
        run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        images[scale] = _read(str(out / case / f"{case}_flair.nii.gz")).astype(np.float64)
        segs[scale] = (out / case / f"{case}_seg.nii.gz").read_bytes()
    assert segs["0"] == segs["1"] == segs["2"]
    bright = images["0"] > np.percentile(images["0"][images["0"] > 0], 50)  # away from the noise floor
    ratio, ratio2 = images["1"][bright] / images["0"][bright], images["2"][bright] / images["0"][bright]
    assert np.exp(-0.3) < ratio.min() and ratio.max() < np.exp(0.3) and ratio.std() > 0.02
    assert np.corrcoef(np.log(ratio2), 2 * np.log(ratio))[0, 1] > 0.95


def test_the_pipeline_multiplies_its_patches_by_a_bias_field_when_configured(tiny_config):
    """data.augment.bias_field_probability through train_dataset (what the train command reads):
    with every other transform off, a patch at probability 1 is the same patch at 0 times a field
    whose logarithm is a degree-3 Legendre polynomial over the patch with coefficients in MONAI's
    range, one field for all channels."""
    import itertools

    from segguided_jax.data import augment as aug

    cfgs = []
    for p in (0.0, 1.0):
        cfg = tiny_config.copy_and_resolve_references()
        for key in list(cfg.data.augment.keys()):
            if key.endswith("_probability"):
                cfg.data.augment[key] = 0.0
        cfg.data.augment.bias_field_probability = p
        cfgs.append(cfg)
    plain, biased = (next(iter(train_dataset(c.data.dir, c.data, seed=1, batch_size=2))) for c in cfgs)
    np.testing.assert_array_equal(plain["label"], biased["label"])
    patch = plain["image"].shape[1:4]
    axes = [np.linspace(-1, 1, n) for n in patch]
    legendre = [np.polynomial.legendre.legvander(a, aug.BIAS_FIELD_DEGREE) for a in axes]
    basis = np.stack([np.einsum("x,y,z->xyz", legendre[0][:, i], legendre[1][:, j], legendre[2][:, k]).ravel()
                      for i, j, k in aug.BIAS_FIELD_TERMS], axis=1)
    for row, c in itertools.product(range(2), range(plain["image"].shape[-1])):
        x, y = plain["image"][row, ..., c], biased["image"][row, ..., c]
        inside = np.abs(x) > 0.05
        assert inside.mean() > 0.3
        log_ratio = np.log(y[inside] / x[inside])
        coeffs, *_ = np.linalg.lstsq(basis[inside.ravel()], log_ratio, rcond=None)
        assert np.abs(basis[inside.ravel()] @ coeffs - log_ratio).max() < 1e-4  # exactly such a field
        assert (coeffs > -1e-4).all() and (coeffs < 0.1 + 1e-4).all() and coeffs.max() > 0.01


def test_grain_workers_give_the_in_process_batches_and_resume_from_their_state(tiny_config):
    """data.num_workers > 0 (brats21 runs 8) through train_dataset: the same batches, bit for bit,
    as in the training process, and an iterator restored from a worker iterator's state goes on
    with the batches that would have come next."""
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags, which the train command parses
        flags.FLAGS.mark_as_parsed()
    cfgs = []
    for workers in (0, 1):
        cfg = tiny_config.copy_and_resolve_references()
        cfg.data.num_workers = workers
        cfgs.append(cfg)
    plain = iter(train_dataset(cfgs[0].data.dir, cfgs[0].data, seed=2, batch_size=2))
    worker = iter(train_dataset(cfgs[1].data.dir, cfgs[1].data, seed=2, batch_size=2))
    want = [next(plain) for _ in range(4)]
    for i in range(2):
        got = next(worker)
        for key in want[i]:
            np.testing.assert_array_equal(got[key], want[i][key], err_msg=f"batch {i} {key}")
    state = worker.get_state()
    resumed = iter(train_dataset(cfgs[1].data.dir, cfgs[1].data, seed=2, batch_size=2))
    resumed.set_state(state)
    for i in (2, 3):
        got = next(resumed)
        for key in want[i]:
            np.testing.assert_array_equal(got[key], want[i][key], err_msg=f"resumed batch {i} {key}")
