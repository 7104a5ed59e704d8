"""BraTS-layout case folders (or MSD Task01, or an nnU-Net v2 raw dataset) -> compressed ArrayRecord
shards + manifest.json.

    python -m data_prep.convert --src DIR [DIR ...] --out DIR [--edition 2021|2023|msd|nnunet]
        [--channels M M M M]
        [--test-cases N | --test-fraction F] [--val-cases N | --val-fraction F] [--folds K]
        [--split-seed S] [--spacing X Y Z] [--workers W] [--cases-per-shard N] [--skip-bad]

Every case is validated (see segguided_jax.data.cases), cropped to the brain's non-zero box, optionally
resampled to --spacing, z-scored per modality inside the brain, and its labels mapped to the
internal scheme (0 bg, 1 NCR, 2 ED, 3 ET). The manifest keeps what undoing this needs (original
shape, affine, header fields, crop box, statistics), a fingerprint of the input files and the
settings, and the skipped cases; splits.json holds the train / val / test protocol and k folds
(segguided_jax.data.splits).

Restartable: each shard is written under a temporary name (unique to the writing process) and
renamed when whole, so a killed conversion leaves only whole shards, and running the same command
again converts just the rest. Worker processes die with the conversion that started them.
Bad input stops the conversion at the first bad case (the message names the case and the file) and
removes the --out folder if this run created it, so nothing is left behind; with --skip-bad the rest
converts and skipped.json lists every skipped case and why.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time

from segguided_jax.io import storage
from segguided_jax.data import splits as splits_lib
from segguided_jax.data.cases import CaseError, CaseFiles, find_cases, load_case
from segguided_jax.data.preprocess import preprocess
from segguided_jax.data.records import MANIFEST, MANIFEST_VERSION, encode_case

SETTINGS = "conversion.json"
SKIPPED = "skipped.json"
RECORD_OPTIONS = "group_size:1,zstd:3"  # one case per chunk: random access reads one case
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _write_json(path: str, obj) -> None:
    storage.write_text(path, json.dumps(obj, indent=1))


def shard_name(k: int, n: int) -> str:
    return f"cases-{k:05d}-of-{n:05d}.array_record"


def _shard_done(path: str) -> bool:
    return os.path.exists(path) and os.path.exists(path + ".json")


def convert_shard(path: str, cases: list[CaseFiles], target_spacing, skip_bad: bool) -> int:
    """Converts `cases` into the shard `path` (+ `path`.json with their manifest entries and the
    skipped ones). Returns the number of cases handled. Runs in a worker process."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = f"{path}.{os.getpid()}.tmp"  # unique per process: no other run can rename it
    writer = ArrayRecordWriter(tmp, RECORD_OPTIONS)
    entries, skipped = [], []
    try:
        for cf in cases:
            try:
                case = load_case(cf)
                image, labels, meta = preprocess(case, target_spacing)
            except CaseError as e:
                if not skip_bad:
                    raise
                skipped.append({"id": cf.case_id, "error": str(e)})
                continue
            writer.write(encode_case(case.case_id, image, labels, norm=meta["norm"]))
            entries.append({"id": case.case_id, "has_label": labels is not None, "affine": case.affine.tolist(),
                            "spacing": case.spacing, "header": case.header, "files": case.hashes, **meta})
        writer.close()
        _write_json(path + ".json", {"cases": entries, "skipped": skipped})
        os.replace(tmp, path)  # the shard appears under its name only when whole
    except BaseException:
        # On a full disk close() fails again; the temporary file must go all the same.
        with contextlib.suppress(Exception):
            writer.close()
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return len(cases)


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the kernel kills this worker when the conversion process dies, so a
    killed conversion leaves no workers writing behind a rerun."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _fingerprint(settings: dict, entries: list[dict]) -> str:
    """sha256 over the preprocessing settings and every input file's sha256."""
    content = {"settings": {k: settings[k] for k in ("version", "edition", "target_spacing")},
               "files": {e["id"]: e["files"] for e in entries}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _check_settings(out: str, settings: dict) -> None:
    """A folder converts one set of cases with one set of settings: a rerun of the same command
    continues it, anything else is refused."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, SETTINGS)
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != settings:
                raise CaseError(f"{out} holds a conversion of other cases or with other settings ({path}); "
                                "choose another --out")
    else:
        _write_json(path, settings)
    for name in os.listdir(out):  # leftovers of a killed run (its workers died with it)
        if re.search(r"\.tmp\d*$", name):
            os.remove(os.path.join(out, name))


def _run_jobs(jobs: list, workers: int, total: int, log) -> None:
    start, done = time.time(), 0
    tty = sys.stdout.isatty()  # one updating line on a terminal, a line per shard in a log

    def tick(n):
        nonlocal done
        done += n
        rate = done / max(time.time() - start, 1e-9)
        log(("\r" if tty else "") + f"convert: {done}/{total} cases | {1 / rate:.2f} s/case | "
            f"ETA {int((total - done) / rate)} s", end="" if tty else "\n", flush=True)

    if workers <= 1:
        for job in jobs:
            tick(convert_shard(*job))
    else:
        # spawn: workers must not inherit a parent's threads (JAX, Grain) through fork.
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_die_with_parent, initargs=(os.getpid(),)) as ex:
            futures = [ex.submit(convert_shard, *job) for job in jobs]
            try:
                for fut in concurrent.futures.as_completed(futures):
                    tick(fut.result())
            except BaseException:
                ex.shutdown(wait=True, cancel_futures=True)
                raise
    if jobs and tty:
        log("")


def _gather(out: str, names: list[str], log) -> tuple[list, list]:
    """Manifest entries (with their shard and record index) and skipped cases of every shard."""
    entries, skipped = [], []
    for name in names:
        with open(os.path.join(out, name + ".json")) as f:
            part = json.load(f)
        skipped += part["skipped"]
        for e in part["cases"]:
            entries.append({**e, "shard": name, "record": len(entries)})
    if skipped:
        _write_json(os.path.join(out, SKIPPED), skipped)
        log(f"convert: skipped {len(skipped)} bad case(s); see {os.path.join(out, SKIPPED)}")
    return entries, skipped


def _count(n_given: int | None, fraction: float, of: int) -> int:
    return n_given if n_given is not None else int(round(fraction * of))


def convert(srcs, out: str, *, edition: str | None = None, target_spacing=None, test_cases: int | None = None,
            test_fraction: float = 0.2, val_cases: int | None = None, val_fraction: float = 0.2, folds: int = 5,
            split_seed: int = 0, cases_per_shard: int = 8, workers: int = 1, skip_bad: bool = False,
            channels=None, log=print) -> dict:
    """Converts the cases under `srcs` into `out` (see the module docstring); returns the manifest.
    test_cases (else test_fraction of the labelled cases) are held out; val_cases (else
    val_fraction of the rest) validate. `channels`: the modality of each channel of an nnU-Net
    dataset whose channel_names are not recognisable."""
    srcs = [srcs] if isinstance(srcs, str) else list(srcs)
    edition, cases = find_cases(srcs, edition, channels)
    fresh = not os.path.exists(out)
    try:
        return _convert(srcs, out, edition, cases, target_spacing=target_spacing, test_cases=test_cases,
                        test_fraction=test_fraction, val_cases=val_cases, val_fraction=val_fraction, folds=folds,
                        split_seed=split_seed, cases_per_shard=cases_per_shard, workers=workers, skip_bad=skip_bad,
                        log=log)
    except CaseError:
        # Bad input leaves nothing behind in a folder this run created; a kill (no exception here)
        # keeps the whole shards, so that a rerun converts just the rest.
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _convert(srcs, out, edition, cases, *, target_spacing, test_cases, test_fraction, val_cases, val_fraction,
             folds, split_seed, cases_per_shard, workers, skip_bad, log) -> dict:
    settings = {"version": MANIFEST_VERSION, "edition": edition,
                "target_spacing": None if target_spacing is None else [float(s) for s in target_spacing],
                "cases_per_shard": cases_per_shard, "record_options": RECORD_OPTIONS,
                "skip_bad": skip_bad, "cases": [c.case_id for c in cases]}
    _check_settings(out, settings)
    groups = [cases[i: i + cases_per_shard] for i in range(0, len(cases), cases_per_shard)]
    names = [shard_name(k, len(groups)) for k in range(len(groups))]
    pending = [k for k in range(len(groups)) if not _shard_done(os.path.join(out, names[k]))]
    total = sum(len(groups[k]) for k in pending)
    if pending:
        log(f"convert: {total} of {len(cases)} {edition} cases to do, {len(pending)} shard(s), {workers} worker(s)")
    _run_jobs([(os.path.join(out, names[k]), groups[k], settings["target_spacing"], skip_bad) for k in pending],
              workers, total, log)

    entries, skipped = _gather(out, names, log)
    labelled = [e["id"] for e in entries if e["has_label"]]
    unlabelled = [e["id"] for e in entries if not e["has_label"]]
    n_test = _count(test_cases, test_fraction, len(labelled))
    n_val = _count(val_cases, val_fraction, len(labelled) - n_test)
    try:
        splits = splits_lib.write_or_check(out, labelled, unlabelled, test_cases=n_test, val_cases=n_val,
                                           folds=folds, seed=split_seed)
    except ValueError as e:
        raise CaseError(str(e)) from e
    manifest = {"version": MANIFEST_VERSION, "edition": edition, "modalities": ["t1", "t1ce", "t2", "flair"],
                "target_spacing": settings["target_spacing"], "fingerprint": _fingerprint(settings, entries),
                "shards": names, "cases": entries, "skipped": skipped}
    _write_json(os.path.join(out, MANIFEST), manifest)  # last: its presence means complete
    holdout = splits["holdout"]
    log(f"converted {len(entries)} {edition} cases ({len(holdout['train'])} train, {len(holdout['val'])} val, "
        f"{len(holdout['test'])} test, {len(unlabelled)} prediction-only, {len(skipped)} skipped) "
        f"into {len(names)} shard(s) in {out}")
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--edition", choices=["2021", "2023", "msd", "nnunet"],
                        help="default: detected from the names (nnunet: from an nnU-Net v2 dataset.json)")
    parser.add_argument("--channels", nargs=4, metavar="M", type=str.lower,
                        help="nnU-Net datasets: the modality (t1, t1ce, t2, flair) of channels 0000..0003 in order, "
                             "when dataset.json's channel_names are not recognisable")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="resample to this spacing in mm (default: keep the input's)")
    parser.add_argument("--test-cases", type=int, help="held-out test cases (the paper: 251 of 1,251)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="held-out share of the labelled cases if --test-cases is not given")
    parser.add_argument("--val-cases", type=int, help="validation cases, drawn from the non-test cases")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="validation share of the non-test cases if --val-cases is not given")
    parser.add_argument("--folds", type=int, default=5, help="k-fold splits inside the non-test cases")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--cases-per-shard", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (each holds one case at a time)")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad cases and list them in skipped.json")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.out, edition=args.edition, target_spacing=args.spacing, test_cases=args.test_cases,
                test_fraction=args.test_fraction, val_cases=args.val_cases, val_fraction=args.val_fraction,
                folds=args.folds, split_seed=args.split_seed, cases_per_shard=args.cases_per_shard,
                workers=args.workers, skip_bad=args.skip_bad, channels=args.channels)
    except CaseError as e:
        sys.exit(f"convert: error: {e}")


if __name__ == "__main__":
    main()
