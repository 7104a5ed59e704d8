"""Run a config's sweep (get_sweep(name) in the config file; see segguided_jax/experiments/sweep.py).

    python launch/sweep.py --config=configs/synthetic.py --root=runs/sweep [--sweep=ablation|lambda|overhang|seeds]
        [--mode=local] [-- TRAIN ARGS]

--sweep        which of the config's sweeps (default "ablation": gates + auxiliary loss, gates with
               λ = 0, no gates; "lambda": the auxiliary loss weight λ in {0.03, 0.1, 0.3, 1.0};
               "overhang": patches reaching past the case's borders against the config's;
               "seeds": the config as it is over 3 seeds).

--mode=local   runs every unfinished run here, one after another (a rerun skips finished runs and
               resumes unfinished ones from their checkpoints), evaluates each on the held-out
               cases, then writes the report (ROOT/report/report.md, CSV, PNG).
--mode=print   prints one shell command per run, then the command that writes the report.
--mode=slurm   writes ROOT/sweep.sbatch, a SLURM job array with one task per run; after it has
               finished, --mode=report writes the report. ROOT must be a folder the SLURM nodes
               share (sbatch reads the script from it), not a gs:// URI.
--mode=report  writes the report from finished runs.
Arguments after -- go to every run's trainer (e.g. --config.train.steps=200).
--root may be a gs:// URI (runs and report in a bucket) in every mode but slurm.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segguided_jax.io import storage  # noqa: E402
from segguided_jax.experiments import sweep as sweep_lib  # noqa: E402


def load_sweep(config_path: str, name: str) -> dict:
    spec = importlib.util.spec_from_file_location("sweep_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        sys.exit(f"{config_path} defines no get_sweep()")
    try:
        return module.get_sweep(name)
    except KeyError:
        sys.exit(f"{config_path} has no sweep {name!r}")


def train_command(config: str, workdir: str, run, extra) -> list[str]:
    return [sys.executable, "-m", "segguided_jax.train", f"--config={config}", f"--workdir={workdir}",
            *run.train_args(), *extra]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--sweep", default="ablation", help="which of the config's sweeps")
    parser.add_argument("--mode", choices=["local", "print", "slurm", "report"], default="local")
    parser.add_argument("--evaluate-run", metavar="WORKDIR", help=argparse.SUPPRESS)
    parser.add_argument("--model", metavar="MODEL",
                        help="with --evaluate-run: evaluate this exported model file instead of the run's checkpoint")
    args = parser.parse_args(argv)
    if args.evaluate_run:
        print(sweep_lib.evaluate_run(args.evaluate_run, model=args.model))
        return
    sweep = load_sweep(args.config, args.sweep)
    runs = sweep_lib.expand(sweep)
    report = storage.join(args.root, "report")
    me = [sys.executable, os.path.abspath(__file__), f"--config={args.config}", f"--root={args.root}",
          f"--sweep={args.sweep}"]
    if args.mode in ("print", "slurm"):
        lines = []
        for run in runs:
            workdir = storage.join(args.root, run.name)
            lines.append(shlex.join(train_command(args.config, workdir, run, extra)) + " && "
                         + shlex.join(me + [f"--evaluate-run={workdir}"]))
        if args.mode == "print":
            print("\n".join(lines))
            print(shlex.join(me + ["--mode=report"]))
            return
        if storage.is_remote(args.root):
            sys.exit(f"--mode=slurm: --root {args.root} is a bucket, but sbatch and the job array read "
                     "ROOT/sweep.sbatch and ROOT/sweep_commands.sh from a file system: give a --root on a "
                     f"file system the SLURM nodes share, or print the commands with --mode=print")
        os.makedirs(args.root, exist_ok=True)
        commands = os.path.join(args.root, "sweep_commands.sh")
        with open(commands, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.root, "sweep.sbatch"), "w") as f:
            f.write(f"""#!/usr/bin/env bash
#SBATCH --job-name=segguided-sweep
#SBATCH --array=0-{len(lines) - 1}
#SBATCH --gpus=1
#SBATCH --cpus-per-task=16
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
cd {shlex.quote(ROOT)}
source launch/env.sh
eval "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(os.path.abspath(commands))})"
""")
        print(f"wrote {args.root}/sweep.sbatch ({len(lines)} runs): sbatch it, then: {shlex.join(me + ['--mode=report'])}")
        return
    if args.mode == "local":
        for i, run in enumerate(runs):
            workdir = storage.join(args.root, run.name)
            if sweep_lib.is_finished(args.root, run):
                print(f"sweep [{i + 1}/{len(runs)}] {run.name}: finished, skipped", flush=True)
                continue
            print(f"sweep [{i + 1}/{len(runs)}] {run.name}: training", flush=True)
            subprocess.run(train_command(args.config, workdir, run, extra), cwd=ROOT, check=True)
            print(f"sweep [{i + 1}/{len(runs)}] {run.name}: evaluating on the test cases", flush=True)
            sweep_lib.evaluate_run(workdir)
    result = sweep_lib.aggregate(args.root, runs, report, sweep.get("compare", ()), sweep.get("sensitivity"))
    print(storage.read_text(storage.join(report, "report.md")).split("## Bootstrap")[0])
    print(f"report: {storage.join(report, 'report.md')}")
    return result


if __name__ == "__main__":
    main()
