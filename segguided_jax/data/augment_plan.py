"""Where a run's training patches are augmented, decided once from the config: the plan that the
pipeline (segguided_jax.data.pipeline) and the train step (segguided_jax.training.steps) both follow,
instead of each reading data.augment_on_device and the sizes behind it.

- On the host (data.augment_on_device False): the pipeline augments each patch
  (transforms.train_patch) and ships finished patches; the step takes them as they are.
- On the device (True): the pipeline ships, of each row's enlarged crop, the box its random draws
  can read, as the records store it (data.device_crop_dtype), with the draws
  (transforms.enlarged_crop); the step augments them first (device_augment.augment_boxes).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from segguided_jax.data.augment import initial_patch_size
from segguided_jax.data.device_augment import draws_size


@dataclasses.dataclass(frozen=True)
class AugmentPlan:
    """on_device: whether the train step augments (data.augment_on_device);
    patch: the final patch's edges (data.patch), three ints;
    enlarged: the enlarged crop's edges, the box rotation and scaling may read
      (augment.initial_patch_size(data.patch, data.augment); equal to patch without either);
    crop_dtype: how the boxes travel on device ("int16" or "float32", data.device_crop_dtype)."""
    on_device: bool
    patch: tuple[int, int, int]
    enlarged: tuple[int, int, int]
    crop_dtype: str

    @classmethod
    def from_data(cls, data_cfg) -> AugmentPlan:
        """The plan of config.data."""
        patch = tuple(int(s) for s in data_cfg.patch)
        return cls(on_device=bool(data_cfg.augment_on_device), patch=patch,
                   enlarged=tuple(int(s) for s in initial_patch_size(patch, data_cfg.augment)),
                   crop_dtype=str(data_cfg.device_crop_dtype))

    @property
    def slot(self) -> int:
        """Voxels of the largest box a row can ship on the device path: the whole enlarged crop."""
        return math.prod(self.enlarged)

    @property
    def shared_keys(self) -> tuple[str, ...]:
        """Keys of a group of batches that every batch of it takes whole (the pipeline's
        _SplitGroup): on the device path the rows' boxes, into which each batch's offsets index."""
        return ("image", "label") if self.on_device else ()

    def batch_arrays(self, rows: int, channels: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """(shape, dtype) of each array of a training batch of `rows` rows as the train step takes it:
        host path {"image": (rows, *patch, C) float32, "label": (rows, *patch) uint8}; device path
        each row's box in a slot of its own {"image": (rows, slot, C) crop_dtype, "label": (rows,
        slot) uint8, "box": (rows, 7) int32, "norm": (rows, C, 2) float32, "augment": (rows, A)
        float32} (sharding.global_batch lays the pipeline's concatenated rows out so)."""
        if not self.on_device:
            return {"image": ((rows, *self.patch, channels), np.dtype(np.float32)),
                    "label": ((rows, *self.patch), np.dtype(np.uint8))}
        return {"image": ((rows, self.slot, channels), np.dtype(self.crop_dtype)),
                "label": ((rows, self.slot), np.dtype(np.uint8)),
                "box": ((rows, 7), np.dtype(np.int32)),
                "norm": ((rows, channels, 2), np.dtype(np.float32)),
                "augment": ((rows, draws_size(channels)), np.dtype(np.float32))}
