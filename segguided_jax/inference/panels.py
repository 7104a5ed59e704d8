"""One PNG per predicted case: the images, the prediction and the attention maps at a glance.

Rows: axial, coronal and sagittal slices through the centre of mass of the predicted whole tumour
(the volume's centre when nothing is predicted). Columns: FLAIR, T1ce, the prediction (NCR, ED,
ET) over FLAIR, then each sub-region attention map (NCR, ED, ET) as a heat overlay on FLAIR.

Slices are shown the way radiology viewers show them: the volume is first reoriented to RAS with
its affine, then axial and coronal slices have the patient's right on the image's left
(radiological convention) with anterior (axial) or superior (coronal) up; sagittal slices have
superior up and anterior on the left. Letters at the image edges name the directions, and voxel
spacing sets the aspect ratio, so anisotropic volumes are not distorted.

Drawn with a bare matplotlib Figure on the Agg canvas: no pyplot, no global state, safe in any
process.
"""
from __future__ import annotations

import io

import numpy as np
from scipy import ndimage

from segguided_jax.data.brats import SUBREGIONS

# BraTS's customary colours: necrotic core red, oedema green, enhancing tumour yellow.
LABEL_COLOURS = {1: (0.90, 0.10, 0.10), 2: (0.15, 0.80, 0.15), 3: (1.00, 0.90, 0.10)}
LABEL_ALPHA = 0.55
HEAT_CMAP = "inferno"
FONT_SIZE = 12
PANEL_INCHES = 3.0  # width of one image at 100 dpi


def orientation(affine) -> np.ndarray:
    """nibabel's (3, 2) orientation: row i = (RAS axis of array axis i, +1 or -1 if flipped)."""
    if affine is None:
        return np.array([[0, 1], [1, 1], [2, 1]], np.float64)
    import nibabel as nib

    return nib.orientations.io_orientation(affine)


def _input_index(ornt: np.ndarray, shape, ras_axis: int, ras_index: int) -> str:
    """'i=12' etc.: the slice's index along the input array's own axis, as a viewer shows it."""
    i = int(np.flatnonzero(ornt[:, 0] == ras_axis)[0])
    index = ras_index if ornt[i, 1] > 0 else shape[ras_axis] - 1 - ras_index
    return f"{'ijk'[i]}={index}"


def slice_centre(labels: np.ndarray) -> tuple:
    """Voxel index of the tumour's (labels > 0) centre of mass, or of the volume's centre."""
    if labels.any():
        return tuple(int(round(c)) for c in ndimage.center_of_mass(labels > 0))
    return tuple(s // 2 for s in labels.shape)


# For a RAS volume: (row name, fixed axis, (top, bottom, left, right) letters, (row axis, column
# axis) of the displayed image, for the aspect ratio). Every view is shown with `displayed`.
VIEWS = (
    ("axial", 2, ("A", "P", "R", "L"), (1, 0)),
    ("coronal", 1, ("S", "I", "R", "L"), (2, 0)),
    ("sagittal", 0, ("S", "I", "A", "P"), (2, 1)),
)


def displayed(plane: np.ndarray) -> np.ndarray:
    """A 2-D slice of a RAS volume -> the displayed image: rot90 puts the high end of the slice's
    second axis (A or S) at the top, fliplr the high end of its first (R, or A for sagittal) on the
    left."""
    return np.fliplr(np.rot90(plane))


def _window(image: np.ndarray) -> tuple:
    """Display range: 0.5th-99.5th percentile of the non-zero (brain) voxels."""
    vals = image[image != 0]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _label_rgba(labels: np.ndarray) -> np.ndarray:
    rgba = np.zeros(labels.shape + (4,), np.float32)
    for value, colour in LABEL_COLOURS.items():
        rgba[labels == value] = colour + (LABEL_ALPHA,)
    return rgba


def _draw_cell(ax, name: str, index: tuple, images: dict, ranges: dict, aspect: float, heat) -> None:
    """One image of the grid: a grey base (T1ce for its column, FLAIR otherwise), then the
    prediction's colours, or an attention map as a heat overlay outlined by its own sub-region of
    the prediction (so a map can be read against what it should follow)."""
    base = "t1ce" if name == "T1ce" else "flair"
    ax.imshow(displayed(images[base][index]), cmap="gray", vmin=ranges[base][0], vmax=ranges[base][1], aspect=aspect,
              interpolation="nearest")
    labels = displayed(images["labels"][index])
    if name == "prediction":
        ax.imshow(_label_rgba(labels), aspect=aspect, interpolation="nearest")
    elif name.startswith("attention"):
        k = SUBREGIONS.index(name.split()[-1])
        a = np.clip(displayed(images["attention"][index + (k,)]), 0.0, 1.0)
        rgba = heat[1](heat[0](a))
        rgba[..., 3] = 0.75 * np.sqrt(a)  # low attention stays see-through
        ax.imshow(rgba, aspect=aspect, interpolation="nearest")
        mask = labels == k + 1
        if mask.any() and not mask.all():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[LABEL_COLOURS[k + 1]], linewidths=1.2)


def _letters(ax, letters) -> None:
    top, bottom, left, right = letters
    style = dict(color="white", fontsize=FONT_SIZE - 3, transform=ax.transAxes, fontweight="bold")
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)


def _footer(fig, footer, heat, with_attention: bool) -> None:
    """The label legend under the prediction and a colour bar under each attention map."""
    from matplotlib import cm
    from matplotlib.patches import Patch

    legend = [Patch(facecolor=LABEL_COLOURS[v], label=n) for v, n in zip((1, 2, 3), SUBREGIONS)]
    footer[2].legend(handles=legend, loc="center", ncol=3, fontsize=FONT_SIZE - 1, frameon=False,
                     handlelength=1.2, columnspacing=0.8)
    if not with_attention:
        return
    mappable = cm.ScalarMappable(norm=heat[0], cmap=heat[1])
    for c, sub in zip(range(3, 6), SUBREGIONS):
        footer[c].axis("on")
        bar = fig.colorbar(mappable, cax=footer[c], orientation="horizontal")
        bar.ax.tick_params(labelsize=FONT_SIZE - 3)
        bar.set_label(f"attention; outline: predicted {sub}", fontsize=FONT_SIZE - 3)


def save_panel(path: str, flair: np.ndarray, t1ce: np.ndarray, labels: np.ndarray,
               attention: np.ndarray | None, spacing, title: str, affine=None) -> None:
    """Writes the case's panel PNG to `path`, a local path or gs:// URI, whole or not at all
    (storage.write_bytes).

    flair, t1ce: (X, Y, Z) raw intensities; labels: (X, Y, Z) internal labels 0..3 (1 NCR, 2 ED,
    3 ET); attention: (X, Y, Z, 3) NCR/ED/ET maps in [0, 1], or None for no attention columns;
    spacing: the voxel size in mm along X, Y, Z; affine: the volumes' voxel-to-world matrix, used
    to orient the slices (None: the arrays are taken to be RAS already). All on the same grid.
    """
    import matplotlib
    from matplotlib import colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from nibabel.orientations import apply_orientation

    from segguided_jax.io import storage

    ornt = orientation(affine)
    ras_spacing = np.empty(3)
    ras_spacing[ornt[:, 0].astype(int)] = spacing
    images = {"flair": flair, "t1ce": t1ce, "labels": labels}
    if attention is not None:
        images["attention"] = attention
    images = {k: apply_orientation(v, ornt) for k, v in images.items()}
    centre = slice_centre(images["labels"])
    columns = ["FLAIR", "T1ce", "prediction"] + ([f"attention {s}" for s in SUBREGIONS] if attention is not None else [])
    ranges = {k: _window(images[k]) for k in ("flair", "t1ce")}
    heat = (colors.Normalize(0.0, 1.0), matplotlib.colormaps[HEAT_CMAP])

    # Rows as tall as their slices are (in mm) for their width, plus a thin row for the legend
    # and the colour bars: a bar attached to a column would shrink that column's images.
    extent = np.asarray(images["labels"].shape) * ras_spacing
    ratios = [extent[row_axis] / extent[col_axis] for _, _, _, (row_axis, col_axis) in VIEWS] + [0.12]
    fig = Figure(figsize=(PANEL_INCHES * len(columns), PANEL_INCHES * sum(ratios) + 1.0), dpi=100,
                 layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=FONT_SIZE + 2)
    grid = fig.add_gridspec(len(VIEWS) + 1, len(columns), height_ratios=ratios)
    footer = [fig.add_subplot(grid[-1, c]) for c in range(len(columns))]
    for ax in footer:
        ax.axis("off")
    for r, (view, axis, letters, (row_axis, col_axis)) in enumerate(VIEWS):
        index = tuple(centre[axis] if a == axis else slice(None) for a in range(3))
        for c, name in enumerate(columns):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
            _draw_cell(ax, name, index, images, ranges, ras_spacing[row_axis] / ras_spacing[col_axis], heat)
            if r == 0:
                ax.set_title(name, fontsize=FONT_SIZE)
            if c == 0:
                ax.set_ylabel(f"{view} ({_input_index(ornt, images['labels'].shape, axis, centre[axis])})",
                              fontsize=FONT_SIZE)
            _letters(ax, letters)
    _footer(fig, footer, heat, attention is not None)
    png = io.BytesIO()
    fig.savefig(png, format="png", facecolor="white")
    storage.write_bytes(path, png.getvalue())
