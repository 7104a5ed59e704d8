"""From region probabilities to BraTS labels: threshold, nesting, and post-processing rules, with
the component-size rule learned on the validation cases.

`PostProcessing.labels(probs, spacing)` applies, in this order:
1. threshold the ET/TC/WT probabilities and nest them the nnU-Net way (WT without TC is ED, TC
   without ET is NCR, ET is ET);
2. per region, WT then TC then ET, remove the 26-connected components whose volume is below
   `min_volume_mm3[region]`: a WT component becomes background (with everything inside it), a TC
   component becomes oedema, an ET component becomes NCR. These sizes are learned on the validation
   cases by `fit` (what BraTS 2023 entries do against the lesion-wise metrics, where each false-
   positive speck counts as a missed lesion) and stored beside the model (postprocessing.json);
3. the ET rule: "component" turns each ET component of fewer than `min_et_voxels` voxels into NCR;
   "case" (nnU-Net's BraTS rule) turns all ET into NCR when the case has fewer than
   `min_et_voxels` ET voxels in all.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
from scipy import ndimage

from segguided_jax.io import storage
from segguided_jax.data.brats import REGIONS, labels_to_regions, regions_to_labels
from segguided_jax.evaluation.metrics import LESION_MIN_VOLUME_MM3, lesion_wise

FILE = "postprocessing.json"
_CONNECTIVITY_26 = np.ones((3, 3, 3), bool)
# Default candidate minimum component volumes (mm³) that `choose` picks from, per region (configs:
# eval.postprocess_candidates_mm3), about evenly spaced in log volume.
CANDIDATES_MM3 = (0, 10, 25, 50, 100, 250, 500, 1000, 2500)
# How `choose` picks among the candidates that tie on the val cases (configs: eval.postprocess_rule).
CHOICE_RULES = ("plateau_middle", "smallest", "largest")
# Label a removed component of each region becomes (see the module docstring).
_REMOVED_TO = {"WT": 0, "TC": 2, "ET": 1}


def remove_small_components(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """Boolean (X, Y, Z) -> the mask of its 26-connected components with at least min_voxels voxels."""
    if min_voxels <= 1 or not mask.any():
        return mask.copy()
    components, n = ndimage.label(mask, structure=_CONNECTIVITY_26)
    sizes = np.bincount(components.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[components]


@dataclasses.dataclass(frozen=True)
class PostProcessing:
    threshold: float = 0.5
    et_rule: str = "component"  # "component" or "case"
    min_et_voxels: int = 0
    min_volume_mm3: dict = dataclasses.field(default_factory=lambda: {r: 0.0 for r in REGIONS})

    def __post_init__(self):
        if self.et_rule not in ("component", "case"):
            raise ValueError(f"eval.et_rule must be 'component' or 'case', got {self.et_rule!r}")

    @classmethod
    def from_config(cls, eval_cfg, learned: dict | None = None) -> "PostProcessing":
        """From a config's `eval` block, with learned component sizes (postprocessing.json's
        "min_volume_mm3") if given."""
        sizes = {r: 0.0 for r in REGIONS}
        if learned:
            sizes.update({r: float(v) for r, v in learned.items()})
        return cls(threshold=float(eval_cfg.threshold), et_rule=str(eval_cfg.get("et_rule", "component")),
                   min_et_voxels=int(eval_cfg.get("min_et_voxels", 0)), min_volume_mm3=sizes)

    def labels(self, probs: np.ndarray, spacing) -> np.ndarray:
        """ET/TC/WT probabilities (X, Y, Z, >=3) on a grid of `spacing` mm -> internal labels uint8."""
        labels = regions_to_labels(probs[..., :3] > self.threshold)
        voxel_mm3 = float(np.prod(spacing))
        for region in ("WT", "TC", "ET"):
            min_voxels = self.min_volume_mm3.get(region, 0.0) / voxel_mm3
            if min_voxels > 1:
                mask = labels_to_regions(labels)[..., REGIONS.index(region)]
                labels = np.where(mask & ~remove_small_components(mask, min_voxels),
                                  np.uint8(_REMOVED_TO[region]), labels).astype(np.uint8)
        return self._et_rule(labels)

    def _et_rule(self, labels: np.ndarray) -> np.ndarray:
        if self.min_et_voxels <= 1:
            return labels
        et = labels == 3
        if self.et_rule == "case":
            small = et if et.sum() < self.min_et_voxels else np.zeros_like(et)
        else:
            small = et & ~remove_small_components(et, self.min_et_voxels)
        return np.where(small, np.uint8(1), labels).astype(np.uint8)

    def describe(self) -> str:
        sizes = ", ".join(f"{r} {self.min_volume_mm3.get(r, 0):g}" for r in ("WT", "TC", "ET"))
        return (f"threshold {self.threshold}, components below [{sizes}] mm³ removed, ET rule "
                f"{self.et_rule} < {self.min_et_voxels} voxels")


def fit_scores(probs: np.ndarray, ref_labels: np.ndarray, spacing, base: PostProcessing,
               candidates=CANDIDATES_MM3) -> np.ndarray:
    """One validation case's lesion-wise Dice per region (REGIONS order) and candidate minimum
    volume: (3, len(candidates)). Each region is scored with only its own rule varied (the others
    at `base`), so cases can be scored one at a time and the choice made from their sum."""
    ref_regions = labels_to_regions(ref_labels)
    scores = np.zeros((len(REGIONS), len(candidates)))
    for i, region in enumerate(REGIONS):
        last = None
        for j, size in enumerate(candidates):
            pp = dataclasses.replace(base, min_volume_mm3={**base.min_volume_mm3, region: float(size)})
            pred = labels_to_regions(pp.labels(probs, spacing))[..., i]
            if last is not None and np.array_equal(pred, last[0]):
                scores[i, j] = last[1]  # this size removes nothing more: same score
                continue
            scores[i, j] = lesion_wise(pred, ref_regions[..., i], spacing)["dice"]
            last = (pred, scores[i, j])
    return scores


def choose(total_scores: np.ndarray, num_cases: int, candidates=CANDIDATES_MM3, rule: str = "plateau_middle",
           floor_mm3: float = LESION_MIN_VOLUME_MM3) -> dict:
    """The learned rule from the summed fit_scores of the validation cases. Per region, the
    candidates whose mean lesion-wise Dice ties the best form the plateau; `rule` picks in it:
    "smallest" (the smallest tied candidate), "largest" (the largest removal that does not lower
    val lesion-wise Dice) or "plateau_middle" (the middle of the widest run of tied candidates).
    With a handful of val cases a wide plateau is the normal case: its ends are the largest false
    positive and the smallest true lesion those cases happen to have, so its middle keeps the
    widest margin to both (the candidates are about evenly spaced in log volume), where "smallest"
    sits against the false positives the val cases showed and "largest" against the lesions.
    Then `floor_mm3` (0: none) where the val cases cannot decide, i.e. a pick below it moves up to it
    when the pick's run reaches it: BraTS's lesion-wise metric does not count reference lesions of
    at most 50 mm³, so removing smaller components costs a counted lesion only by deleting a gross
    under-segmentation of it.
    Returns the JSON-able record stored as postprocessing.json."""
    if rule not in CHOICE_RULES:
        raise ValueError(f"eval.postprocess_rule must be one of {CHOICE_RULES}, got {rule!r}")
    candidates = [float(c) for c in candidates]
    mean = total_scores / max(num_cases, 1)
    chosen = {}
    for i, region in enumerate(REGIONS):
        index = np.flatnonzero(np.isclose(mean[i], mean[i].max()))
        # Contiguous runs of tied candidates, as (first, last) indices.
        runs = [(int(r[0]), int(r[-1])) for r in np.split(index, np.flatnonzero(np.diff(index) > 1) + 1)]
        if rule == "smallest":
            run = runs[0]
            pick = run[0]
        elif rule == "largest":
            run = runs[-1]
            pick = run[1]
        else:
            run = max(runs, key=lambda r: r[1] - r[0])  # the widest; the first among equals
            pick = (run[0] + run[1]) // 2
        above = [j for j in range(run[0], run[1] + 1) if candidates[j] >= floor_mm3]
        if candidates[pick] < floor_mm3 and above:
            pick = above[0]
        chosen[region] = candidates[pick]
    return {"min_volume_mm3": chosen, "cases": num_cases, "candidates_mm3": candidates, "rule": rule,
            "floor_mm3": float(floor_mm3),
            "lesion_dice_by_candidate": {r: [float(v) for v in mean[i]] for i, r in enumerate(REGIONS)},
            "lesion_dice_without": {r: float(mean[i, 0]) for i, r in enumerate(REGIONS)}}


def save_learned(workdir: str, record: dict) -> str:
    """Writes `record` (from `choose`) as WORKDIR/postprocessing.json (a local path or gs:// URI),
    whole or not at all; returns its path."""
    path = storage.join(workdir, FILE)
    storage.write_text(path, json.dumps(record, indent=1))
    return path


def load_learned(workdir_or_checkpoint: str) -> dict | None:
    """postprocessing.json of a training workdir (for a checkpoint folder WORKDIR/checkpoints/STEP,
    its workdir's), or None. Either may be a local path or a gs:// URI."""
    path = storage.abspath(workdir_or_checkpoint)
    for candidate in (path, storage.dirname(storage.dirname(path))):
        try:
            return json.loads(storage.read_text(storage.join(candidate, FILE)))
        except FileNotFoundError:
            continue
    return None
