"""What a synthetic case's bias fields do to a trained model: the case regenerated from the same
random numbers with the log of its bias fields scaled (data_prep.synthetic --bias-scale; 1 gives
the original files), then predicted and scored through the commands users run (predict, evaluate).
The figures behind "The demo's worst case" in docs/postprocessing.md.

    python benchmarks/bias_counterfactual.py --workdir runs/synthetic --index 21 \
        [--seed 0 --shape 96 96 64 --edition 2021] [--scales 1 0.5 0]
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_prep import synthetic  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a trained run (predict --workdir)")
    parser.add_argument("--index", type=int, nargs="+", required=True, help="case indices of the synthetic set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64))
    parser.add_argument("--edition", default="2021")
    parser.add_argument("--scales", type=float, nargs="+", default=(1.0, 0.5, 0.0))
    args = parser.parse_args(argv)
    print(f"{args.workdir}: seed {args.seed}, shape {tuple(args.shape)}; Dice and lesion-wise Dice ET / TC / WT")
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.scales:
            cases = os.path.join(tmp, f"bias{scale:g}", "cases")
            for index in args.index:
                synthetic.write_case(cases, args.edition, index, args.seed, tuple(args.shape), bias_scale=scale)
            pred, scores = (os.path.join(tmp, f"bias{scale:g}", name) for name in ("pred", "scores"))
            for command in (["predict", "--workdir", args.workdir, "--input", cases, "--out", pred],
                            ["evaluate", "--pred", pred, "--ref", cases, "--out", scores]):
                subprocess.run([sys.executable, "-m", f"segguided_jax.{command[0]}", *command[1:]], check=True,
                               cwd=ROOT, stdout=subprocess.DEVNULL)
            with open(os.path.join(scores, "per_case.csv")) as f:
                for row in csv.DictReader(f):
                    fmt = lambda key: " / ".join(f"{float(row[f'{key}_{r}']):.3f}" for r in ("et", "tc", "wt"))
                    print(f"  bias scale {scale:g}  {row['case_id']}: Dice {fmt('dice')}, lesion-wise {fmt('lesion_dice')}")


if __name__ == "__main__":
    main()
