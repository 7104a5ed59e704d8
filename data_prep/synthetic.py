"""A synthetic BraTS-like set, in the real folder layout and naming of either edition.

    python -m data_prep.synthetic --out DIR --cases N --edition 2021|2023 --seed S [--shape X Y Z] [--lesions K]
        [--bias-scale B]

Each case is a skull-stripped brain (grey matter, white matter, ventricles and sulcal CSF) with a
glioma: an enhancing rim (ET) on T1ce around a dark necrotic core (NCR), surrounded by oedema (ED)
that is bright on T2 and FLAIR. About one case in five has no enhancing tumour. Every case varies
in brain shape, tumour size, shape and location, bias field, noise and intensity scale. With
--lesions K each case has K - 1 smaller satellite tumours besides the main one (multifocal glioma:
the case for BraTS 2023's lesion-wise metrics).

The field of view is always the BraTS one (240 x 240 x 155 mm); a smaller --shape gives coarser
voxels (the header's spacing says so), not a smaller head. Same seed -> identical files.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import os
import sys

import nibabel as nib
import numpy as np
from scipy import ndimage

from segguided_jax.io import storage
from segguided_jax.data.brats import EDITIONS, MODALITIES, case_id_for

FIELD_OF_VIEW_MM = np.array([240.0, 240.0, 155.0])
BRATS_SHAPE = (240, 240, 155)
# Tissue classes and their relative intensity per modality (t1, t1ce, t2, flair).
TISSUES = ("bg", "csf", "gm", "wm", "ed", "ncr", "et")
INTENSITY = np.array([
    # t1    t1ce  t2    flair
    [0.00, 0.00, 0.00, 0.00],  # background (skull-stripped: exactly zero)
    [0.25, 0.25, 1.00, 0.12],  # CSF: dark on T1 and FLAIR, bright on T2
    [0.55, 0.55, 0.62, 0.58],  # grey matter
    [0.82, 0.82, 0.45, 0.45],  # white matter
    [0.50, 0.50, 0.88, 0.98],  # oedema: bright on T2 and FLAIR
    [0.30, 0.22, 0.95, 0.62],  # necrotic core: dark on T1ce
    [0.55, 1.25, 0.72, 0.80],  # enhancing tumour: bright on T1ce
], np.float32)
NO_ET_PROBABILITY = 0.2
# Radius range (mm) of the satellite tumours of a multifocal case (--lesions > 1).
SATELLITE_RADIUS_MM = (6.0, 14.0)
SATELLITE_GAP_MM = 10.0


def _smooth_field(rng, shape, coarse=(6, 6, 5)):
    """A smooth random field in about [-1, 1] over `shape`: coarse noise upsampled cubically to a
    quarter of the resolution, then linearly (cheap, and already smooth at that scale)."""
    noise = rng.standard_normal(coarse).astype(np.float32)
    mid = [max(c, -(-s // 4)) for s, c in zip(shape, coarse)]
    field = ndimage.zoom(noise, [m / c for m, c in zip(mid, coarse)], order=3, mode="nearest", grid_mode=True)
    field = ndimage.zoom(field, [s / m for s, m in zip(shape, field.shape)], order=1, mode="nearest",
                         grid_mode=True)
    return field[: shape[0], : shape[1], : shape[2]] / 1.5


def _grid_mm(shape, spacing):
    """Coordinates in mm relative to the volume centre, as three broadcastable axes."""
    return [((np.arange(n, dtype=np.float32) + 0.5) * s - n * s / 2).reshape(
        [-1 if i == a else 1 for i in range(3)]) for a, (n, s) in enumerate(zip(shape, spacing))]


def synth_case(rng: np.random.Generator, shape=BRATS_SHAPE, lesions: int = 1, bias_scale: float = 1.0):
    """Returns (images (4, X, Y, Z) float32 in MODALITIES order, internal labels uint8, spacing);
    `lesions` separate tumours (1: the single glioma of most BraTS cases). bias_scale multiplies
    the log of every modality's bias field (0: none) and draws the same numbers: the same case
    otherwise, to tell what its bias fields do."""
    shape = tuple(int(s) for s in shape)
    spacing = FIELD_OF_VIEW_MM / np.array(shape)
    x, y, z = _grid_mm(shape, spacing)
    # Brain: an ellipsoid (semi-axes LR, AP, SI in mm) with an irregular surface.
    axes = np.array([68.0, 84.0, 58.0]) * rng.uniform(0.9, 1.08, 3)
    centre = rng.uniform(-4, 4, 3) + np.array([0.0, 0.0, 6.0])
    rho = np.sqrt(((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2
                  + ((z - centre[2]) / axes[2]) ** 2)
    brain = rho < 1.0 + 0.05 * _smooth_field(rng, shape)
    # Cortex: a folded band under the surface; sulcal CSF in its outer part.
    folds = _smooth_field(rng, shape, coarse=(24, 24, 16))
    tissue = np.zeros(shape, np.uint8)
    tissue[brain] = TISSUES.index("wm")
    tissue[brain & (rho > 0.80 + 0.08 * folds)] = TISSUES.index("gm")
    tissue[brain & (rho > 0.93) & (folds > 0.35)] = TISSUES.index("csf")
    # Lateral ventricles: two ellipsoids either side of the midline.
    for side in (-1, 1):
        v = np.sqrt(((x - centre[0] - side * 9) / 7) ** 2 + ((y - centre[1] - 4) / 26) ** 2
                    + ((z - centre[2] - 6) / 11) ** 2)
        tissue[brain & (v < 1)] = TISSUES.index("csf")

    # Glioma: a lumpy ball (WT) containing a lumpy core (TC) that has a necrotic centre (NCR)
    # and, in most cases, an enhancing rim (ET). With lesions > 1, smaller satellite tumours of the
    # same anatomy (multifocal glioma) at least one radius apart from the main one's surface.
    labels = np.zeros(shape, np.uint8)
    main = None
    for k in range(lesions):
        radius = rng.uniform(14, 34) if k == 0 else rng.uniform(*SATELLITE_RADIUS_MM)
        # The main tumour within 0.55 of the brain's semi-axes; satellites within 0.8, their
        # surfaces (lumpy: up to 1.3 radii) at least SATELLITE_GAP_MM from the main one's, so that
        # BraTS's lesion grouping (3 dilations) keeps them apart; a satellite with no room left in
        # this brain is left out.
        reach = 0.55 if k == 0 else 0.8
        for _ in range(1000):
            c = centre + rng.uniform(-reach, reach, 3) * axes
            if np.sum(((c - centre) / axes) ** 2) < reach ** 2 and (
                    main is None or np.linalg.norm(c - main[0]) > 1.3 * (main[1] + radius) + SATELLITE_GAP_MM):
                break
        else:
            continue
        main = main or (c, radius)
        d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / radius
        d = d * (1 + 0.25 * _smooth_field(rng, shape, coarse=(10, 10, 8)))
        core = rng.uniform(0.45, 0.7)
        necrotic = core * rng.uniform(0.45, 0.75)
        has_et = rng.uniform() >= NO_ET_PROBABILITY
        dc = d * (1 + 0.15 * _smooth_field(rng, shape, coarse=(12, 12, 10)))
        # A satellite never overwrites the tumour already drawn (labels only grow inwards).
        free = labels == 0
        labels[brain & free & (d < 1.0)] = 2
        labels[brain & (free | (labels == 2)) & (dc < core)] = 3 if has_et else 1
        labels[brain & (free | (labels == 2)) & (dc < necrotic)] = 1
    tissue[labels == 2] = TISSUES.index("ed")
    tissue[labels == 1] = TISSUES.index("ncr")
    tissue[labels == 3] = TISSUES.index("et")

    # Intensities: class means with texture, partial-volume blur, bias field, Rician noise, scale.
    images = np.empty((4,) + shape, np.float32)
    voxel = float(np.mean(spacing))
    for m in range(4):
        img = INTENSITY[tissue, m] * (1 + 0.04 * _smooth_field(rng, shape, coarse=(30, 30, 20)))
        img = ndimage.gaussian_filter(img, sigma=0.6 / voxel + 0.3)
        bias = np.exp(0.15 * bias_scale * _smooth_field(rng, shape, coarse=(3, 3, 3)))
        sigma = 0.025
        img = np.sqrt((img * bias + sigma * rng.standard_normal(shape, np.float32)) ** 2
                      + (sigma * rng.standard_normal(shape, np.float32)) ** 2)
        images[m] = np.where(brain, img * rng.uniform(400, 1600), 0)
    return images, labels, spacing


def brats_affine(shape, spacing):
    """The orientation BraTS volumes carry (LPS-flipped x and y, as in the released NIfTI files)."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[1, 3] = (shape[1] - 1) * spacing[1]
    return affine


def write_case(out_dir: str, edition_name: str, index: int, seed: int, shape=BRATS_SHAPE, lesions: int = 1,
               bias_scale: float = 1.0) -> str:
    """Writes one case folder; returns its path. Case `index` of seed `seed` is the same whatever
    the other cases are."""
    edition = EDITIONS[edition_name]
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    images, labels, spacing = synth_case(rng, shape, lesions, bias_scale)
    case_id = case_id_for(edition_name, index)
    case_dir = os.path.join(out_dir, case_id)
    os.makedirs(case_dir, exist_ok=True)
    affine = brats_affine(labels.shape, spacing)

    def save(array, suffix):
        img = nib.Nifti1Image(array, affine)
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        storage.write_nifti_gz(img, os.path.join(case_dir, edition.file_name(case_id, suffix)))

    for m, modality in enumerate(MODALITIES):
        save(np.round(images[m]).astype(np.int16), edition.suffixes[modality])
    save(edition.from_internal(labels), edition.seg_suffix)
    return case_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", type=int, required=True)
    parser.add_argument("--edition", choices=sorted(EDITIONS), default="2021")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=BRATS_SHAPE, metavar=("X", "Y", "Z"))
    parser.add_argument("--workers", type=int, default=1, help="cases generated in parallel processes")
    parser.add_argument("--lesions", type=int, default=1,
                        help="separate tumours per case: the main one and LESIONS - 1 smaller satellites")
    parser.add_argument("--bias-scale", type=float, default=1.0,
                        help="multiplies the log of every bias field (0: none); the same cases otherwise")
    args = parser.parse_args(argv)
    if args.lesions < 1:
        parser.error(f"--lesions must be at least 1, got {args.lesions}")
    os.makedirs(args.out, exist_ok=True)
    job = functools.partial(write_case, args.out, args.edition, seed=args.seed, shape=tuple(args.shape),
                            lesions=args.lesions, bias_scale=args.bias_scale)
    tty = sys.stdout.isatty()  # one updating line on a terminal, one line per case in a log
    with concurrent.futures.ProcessPoolExecutor(args.workers) if args.workers > 1 else contextlib.nullcontext() as ex:
        results = ex.map(job, range(args.cases)) if ex else map(job, range(args.cases))
        for i, _ in enumerate(results):
            print(("\r" if tty else "") + f"synthetic: {i + 1}/{args.cases} cases", end="" if tty else "\n", flush=True)
    if tty:
        print()
    print(f"wrote {args.cases} BraTS{args.edition} cases of shape {tuple(args.shape)} to {args.out}")


if __name__ == "__main__":
    main()
