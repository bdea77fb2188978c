"""Visual elements cut from one image: SLIC superpixel segments at several scales, or grid patches.

Pure functions on arrays: an RGB uint8 image (H, W, 3) in, a list of :class:`Element` out. Building a library of
them from a dataset is utils/library.py.
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image

SLIC_SCALES = (10, 20, 30)
FILL = 117  # grey value outside the mask: ImageNet's mean pixel, so the fill carries as little signal as possible


@dataclass
class Element:
    image: Image.Image   # the element, resized to the output size
    method: str          # 'segment' or 'patch'
    scale: int           # SLIC n_segments, or the grid size
    box: tuple           # (top, left, bottom, right), inclusive, in the (resized) source image's pixels
    area: float          # fraction of the source image the mask covers


def slic_label_maps(img, scales=SLIC_SCALES, compactness=10.0, sigma=1.0):
    """One SLIC label map per scale (n_segments)."""
    from skimage.segmentation import slic
    return [slic(img, n_segments=n, compactness=compactness, sigma=sigma, start_label=0, channel_axis=-1)
            for n in scales]


def select_masks(label_maps, max_per_scale=5, max_jaccard=0.5, min_area=0.001):
    """Choose the element masks from per-scale label maps.

    Every label of every map is a candidate. Within a scale, candidates are taken largest first (ties by label); a
    candidate is dropped if it covers less than ``min_area`` of the image or if its Jaccard overlap with any mask kept
    so far (this scale or an earlier one) exceeds ``max_jaccard``; at most ``max_per_scale`` are kept per scale.

    Returns a list of (scale_index, boolean mask).
    """
    kept = []
    for si, labels in enumerate(label_maps):
        ids, counts = np.unique(labels, return_counts=True)
        order = sorted(range(len(ids)), key=lambda j: (-counts[j], ids[j]))
        n_scale = 0
        for j in order:
            if n_scale == max_per_scale:
                break
            if counts[j] < min_area * labels.size:
                continue
            mask = labels == ids[j]
            if any(np.logical_and(mask, m).sum() / np.logical_or(mask, m).sum() > max_jaccard for _, m in kept):
                continue
            kept.append((si, mask))
            n_scale += 1
    return kept


def mask_box(mask):
    """(top, left, bottom, right) of a boolean mask, bottom/right inclusive."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def crop_masked(img, mask, fill=FILL):
    """The pixels of ``img`` under ``mask`` on a ``fill`` background, cropped to the mask's box (last row/column
    included)."""
    t, l, b, r = mask_box(mask)
    out = np.where(mask[..., None], img, np.uint8(fill)).astype(np.uint8)
    return out[t:b + 1, l:r + 1], (t, l, b, r)


def _resized(arr, size):
    return Image.fromarray(arr).resize((size, size), Image.BICUBIC)


def segments(img, scales=SLIC_SCALES, compactness=10.0, sigma=1.0, max_per_scale=5, max_jaccard=0.5,
             min_area=0.001, fill=FILL, out_size=224):
    """SLIC segment elements of an RGB uint8 image."""
    maps = slic_label_maps(img, scales, compactness, sigma)
    out = []
    for si, mask in select_masks(maps, max_per_scale, max_jaccard, min_area):
        arr, box = crop_masked(img, mask, fill)
        out.append(Element(_resized(arr, out_size), "segment", int(scales[si]), box, float(mask.mean())))
    return out


def grid_boxes(h, w, g):
    """Inclusive boxes of a g x g grid over an h x w image (edges spread so every pixel is in exactly one cell)."""
    ys, xs = np.linspace(0, h, g + 1).round().astype(int), np.linspace(0, w, g + 1).round().astype(int)
    return [(int(ys[i]), int(xs[j]), int(ys[i + 1] - 1), int(xs[j + 1] - 1)) for i in range(g) for j in range(g)]


def patches(img, grids=(2, 3), out_size=224):
    """Grid patch elements: the image cut into g x g cells for each g in ``grids``."""
    h, w = img.shape[:2]
    out = []
    for g in grids:
        for t, l, b, r in grid_boxes(h, w, g):
            if b < t or r < l:
                continue  # image smaller than the grid: an empty cell
            out.append(Element(_resized(img[t:b + 1, l:r + 1], out_size), "patch", int(g), (t, l, b, r),
                               (b - t + 1) * (r - l + 1) / (h * w)))
    return out


BACKGROUND_FILL_SHARE = 0.9   # an element that is this much fill (the padding outside its mask) shows almost nothing
BACKGROUND_CONSTANT = 0.8     # ... or whose own pixels are this much one grey level (+-10): one constant region
CONSTANT_TOLERANCE = 10
BACKGROUND_DARK = 0.5         # ... or whose own pixels are at least half near-black: a black surround cut together
DARK_LEVEL = 30               # with a garment's bright rim is one flat level, but for less than BACKGROUND_CONSTANT


def background_measure(image, fill=FILL):
    """(share of pixels equal to the fill, share of the other pixels within CONSTANT_TOLERANCE grey levels of their
    commonest level, share of the other pixels at or below DARK_LEVEL) of an element image (RGB or grey array, or PIL
    image), measured on its grey levels; the second and third are 1 when every pixel is fill."""
    arr = np.asarray(image)
    grey = (arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) if arr.ndim == 3 else
            arr.astype(np.float32)).round().astype(np.int16)
    is_fill = np.abs(grey - fill) <= 2                          # +-2: the bicubic resize's rounding
    rest = grey[~is_fill]
    if len(rest) == 0:
        return 1.0, 1.0, 1.0
    mode = np.bincount(rest.ravel()).argmax()
    return (float(is_fill.mean()), float((np.abs(rest - mode) <= CONSTANT_TOLERANCE).mean()),
            float((rest <= DARK_LEVEL).mean()))


def is_background(image, fill=FILL):
    """True for an element that is mostly background: at least BACKGROUND_FILL_SHARE fill, or its own pixels at least
    BACKGROUND_CONSTANT one grey level (Fashion-MNIST's black surround, a flat wall), or at least BACKGROUND_DARK
    near-black (the black surround with a little foreground: a garment's rim, a strap). Near-black only, not any
    level: a flat bright region with some texture is as often a plain garment's fabric as a wall."""
    share, constant, dark = background_measure(image, fill)
    return share >= BACKGROUND_FILL_SHARE or constant >= BACKGROUND_CONSTANT or dark >= BACKGROUND_DARK
