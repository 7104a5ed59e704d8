"""Writing NIfTI files byte-for-byte reproducibly and atomically."""
from __future__ import annotations

import gzip
import os

import nibabel as nib


def write_nifti_gz(img: nib.Nifti1Image, path: str) -> None:
    """Writes img as .nii.gz. The gzip header's time stamp is fixed so that equal images give
    equal files, and the file appears under its name only once complete."""
    data = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
