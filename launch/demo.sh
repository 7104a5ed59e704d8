#!/usr/bin/env bash
# The demo, from a fresh clone: set up .venv, generate the synthetic BraTS-like set, convert it to
# shards (train / val / test), train SegGuidedNet on it (configs/synthetic.py), then predict the
# held-out test cases from their NIfTI folders and score them with the BraTS metrics, attention
# maps included. Rerunning skips what is done; training resumes from runs/synthetic. Extra
# arguments go to the trainer (e.g. --config.train.steps=200).
start=$(date +%s)
# Seconds per phase, printed at the end.
phase() { local now; now=$(date +%s); PHASES="${PHASES:+$PHASES, }$1 $(( now - ${last:-$start} )) s"; last=$now; }
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
phase set-up
RAW=data/synthetic/raw
PREPARED=data/synthetic/prepared
WORKDIR=runs/synthetic
if [ ! -f "$PREPARED/manifest.json" ]; then
  python -m data_prep.synthetic --out "$RAW" --cases 30 --edition 2021 --seed 0 --shape 96 96 64 --workers 2
  python -m data_prep.convert --src "$RAW" --out "$PREPARED" --test-fraction 0.2 --val-fraction 0.2 \
    --split-seed 0 --workers 2
fi
phase data
python -m segguided_jax.train --config=configs/synthetic.py --workdir="$WORKDIR" \
  --config.data.dir="$PREPARED" "$@"
phase training

# The test cases, never seen by training or validation, as a user would meet them: NIfTI folders.
TEST="$WORKDIR/test_cases"
rm -rf "$TEST" && mkdir -p "$TEST"
for id in $(python -c "import json; print(' '.join(json.load(open('$PREPARED/splits.json'))['holdout']['test']))"); do
  ln -s "$PWD/$RAW/$id" "$TEST/$id"
done
python -m segguided_jax.predict --workdir "$WORKDIR" --input "$TEST" --out "$WORKDIR/test_predictions"
phase predict
python -m segguided_jax.evaluate --pred "$WORKDIR/test_predictions" --ref "$TEST" --out "$WORKDIR/test_scores" >/dev/null
phase evaluate
python - "$WORKDIR" <<'PY'
import json, sys
summary = json.load(open(f"{sys.argv[1]}/test_scores/metrics.json"))["summary"]
mean = lambda k: summary[k]["mean"]
print(f"\nHeld-out test cases ({summary['dice_et']['n']}), never seen in training or validation:")
print("           ET      TC      WT    mean")
for name, key in (("Dice", "dice"), ("lesion Dice", "lesion_dice")):
    values = [mean(f"{key}_{r}") for r in ("et", "tc", "wt")]
    print(f"  {name:<11}" + "".join(f"{v:6.3f}  " for v in values) + f"{sum(values) / 3:.3f}")
print(f"  {'HD95 (mm)':<11}" + "".join(f"{mean(f'hd95_{r}'):6.2f}  " for r in ("et", "tc", "wt")))
print("Attention maps (finest stage) against their own sub-region:")
print("              NCR     ED      ET")
for name, key in (("soft Dice", "attention_soft_dice"), ("mass inside", "attention_mass_inside")):
    print(f"  {name:<11}" + "".join(f"{mean(f'{key}_{s}'):6.3f}  " for s in ("ncr", "ed", "et")))
# Diagonal dominance: in each case, each present sub-region's map has at least twice the soft Dice
# with its own sub-region that it has with any other one.
import csv, math
pairs = [(row["case_id"], s, float(row[f"attention_soft_dice_{s}"]), float(row[f"attention_soft_dice_other_{s}"] or "nan"))
         for row in csv.DictReader(open(f"{sys.argv[1]}/test_scores/per_case.csv")) for s in ("ncr", "ed", "et")
         if row.get(f"attention_soft_dice_{s}") not in (None, "", "nan")]
held = [p for p in pairs if math.isnan(p[3]) or p[2] >= 2 * p[3]]
print(f"  each map's own soft Dice >= 2x its soft Dice with another sub-region: {len(held)} of {len(pairs)} "
      "(case, sub-region) pairs" + "".join(f"; not {c} {s.upper()} ({own:.3f} vs {other:.3f})"
                                           for c, s, own, other in pairs if (c, s, own, other) not in held))
PY
echo "predictions, panels and per-case scores: $WORKDIR/test_predictions, $WORKDIR/test_scores"
echo "demo finished in $(( $(date +%s) - start )) s ($PHASES)"
