"""HD95 on full-size BraTS grids: seconds per call and per case, and the official (BraTS 2023) value
beside MedPy's.

    python benchmarks/hd95.py [--repeats 3]

Builds synthetic 240 x 240 x 155 cases at 1 mm (a ragged tumour: oedema, core, enhancing rim; the
prediction slightly shifted and resized) in three variants: as is, with a far false-positive core
blob, and with sub-voxel anisotropic spacing (0.9, 1.1, 2.3). For each, prints the WT and TC HD95
by both methods with the best time of --repeats calls, then the time of metrics.case_metrics (all
classic and lesion-wise metrics of the three regions) by each method.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from segguided_jax.evaluation import metrics
from segguided_jax.data.brats import labels_to_regions

SHAPE = (240, 240, 155)


def ragged(rng, centre, radii, roughness):
    grid = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    r = np.sqrt(sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, radii)))
    if not roughness:
        return r <= 1
    bumps = ndimage.gaussian_filter(rng.standard_normal(SHAPE).astype(np.float32), 2.0)
    return r <= 1 + roughness * bumps / bumps.std()


def tumour(rng, centre, scale):
    labels = np.zeros(SHAPE, np.uint8)
    for label, radii in ((2, (40, 34, 28)), (3, (22, 19, 16)), (1, (14, 12, 10))):
        labels[ragged(rng, centre, np.multiply(radii, scale), 0.1)] = label
    return labels


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return value, min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ref = tumour(rng, (120, 110, 70), 1.0)
    pred = tumour(rng, (121, 111, 71), 0.97)
    blob = pred.copy()
    blob[ragged(rng, (50, 195, 120), (6, 6, 6), 0)] = 1
    cases = {"near": (pred, (1.0, 1.0, 1.0)), "far core blob": (blob, (1.0, 1.0, 1.0)),
             "anisotropic": (pred, (0.9, 1.1, 2.3))}
    ref_regions = labels_to_regions(ref)
    print(f"grid {SHAPE}; best of {args.repeats}")
    for name, (p, spacing) in cases.items():
        p_regions = labels_to_regions(p)
        for i, region in ((1, "TC"), (2, "WT")):
            cells = []
            for method in metrics.HD95_METHODS:
                value, seconds = best_of(args.repeats, lambda: metrics.hd95(
                    p_regions[..., i], ref_regions[..., i], spacing, method=method))
                cells.append(f"{method} {value:7.2f} mm ({seconds:.2f} s)")
            print(f"  {name:14s} {region}: " + "   ".join(cells))
    for method in metrics.HD95_METHODS:
        _, seconds = best_of(args.repeats, lambda: metrics.case_metrics(blob, ref, (1.0, 1.0, 1.0), hd95_method=method))
        print(f"case_metrics (3 regions, classic + lesion-wise), hd95 {method}: {seconds:.2f} s per case")


if __name__ == "__main__":
    main()
