"""``--decode gpu``: loader workers only read file bytes; JPEGs are decoded in batches on the device (nvJPEG, through
``torchvision.io.decode_jpeg``) and resized, centre-cropped and normalised there with each backbone's own
preprocessing, by tensor operations that imitate PIL's (:func:`resample`; :class:`Normalise` serves the decoded copy
too).

Which images the device decodes is decided per file from its header, in the worker (:func:`device_refusal`): 8-bit,
3-component (YCbCr), sequential JPEGs. Everything else takes the PIL path for that image, in the worker, giving the
very tensors ``--decode pil`` gives: PNGs and other formats, greyscale and CMYK JPEGs (nvJPEG's colour handling differs
from libjpeg's there, or it refuses them), lossless or arithmetic-coded JPEGs, files without an end marker (PIL reports
a truncated file as such), images of in-memory datasets, and progressive JPEGs: those nvJPEG decodes one at a time on
the host (≈ 350-430 images/s on the H200 machine, bench/results/extract_*.txt), slower than PIL in the workers. A JPEG
the device decoder still refuses is decoded by PIL in the main process. Each such image is counted by reason, and the
counts go to the summary line and the entry's info. An image PIL cannot read either stops the run with one error
naming it, as the PIL path stops.

Numerically the device path differs from PIL's in the resize's arithmetic (float filter weights where PIL's are fixed
point: within a grey level) and, on a GPU, in nvJPEG's IDCT and chroma upsampling; ``python -m bench.decode_fidelity``
measures both on real photos.
"""
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from PIL import Image

from .data import UNREADABLE
from .errors import UserError
from .validate import one_line

DECODE_PATHS = ("pil", "cache", "gpu")     # --decode's choices (utils/cli/flags.add_decode_args)
DEVICE_TYPES = ("cuda",)     # devices whose JPEG decoding --decode gpu uses (the tests add "cpu": libjpeg-turbo)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}   # start-of-frame markers


@dataclass(frozen=True)
class DecodeConfig:
    """How a pass decodes its images (the flags of these names): ``decode`` one of :data:`DECODE_PATHS`;
    ``decode_cache`` the folder of --decode cache's decoded copies."""
    decode: str
    decode_cache: str


# ---------------------------------------------------------------------------------------------------------------------
# Device-side preprocessing (PIL's Resize -> CenterCrop -> ToTensor -> Normalize as tensor operations)
# ---------------------------------------------------------------------------------------------------------------------
class Normalise:
    """ToTensor's and Normalize's arithmetic, in place, on (N, 3, H, W) float values 0..255."""

    def __init__(self, mean, std, device):
        # tensors, not Python scalars: CUDA divides by a scalar as a multiplication by its reciprocal (1 ulp off)
        self.k255 = torch.tensor(255.0, device=device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)

    def __call__(self, x):
        return x.div_(self.k255).sub_(self.mean).div_(self.std)


def short_side_size(h, w, size):
    """(h, w) after torchvision's Resize(size) of an h x w image: the short side to ``size``, the long one in
    proportion, rounded down."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resample(x, size, mode):
    """(N, C, H, W) float values 0..255 resized to ``size`` = (h, w) as PIL resizes 8-bit images: antialiased, the
    horizontal pass first, each pass rounded half up and clamped to the uint8 grid (PIL keeps 8 bits between its
    passes; within a grey level of PIL's output, tests/test_decode.py). Nearest picks PIL's very source pixels: the one
    under each output pixel's centre, its coordinate summed pixel by pixel in double precision as PIL's affine loop
    sums it (a product rounds differently where the centre falls on a pixel edge)."""
    h, w = x.shape[2:]
    if mode == "nearest":
        def pick(n_in, n_out):
            step = n_in / n_out
            centres = np.add.accumulate(np.r_[0.5 * step, np.full(n_out - 1, step)])
            return torch.from_numpy(centres.astype(np.int64)).to(x.device)
        return x.index_select(3, pick(w, size[1])).index_select(2, pick(h, size[0]))
    for step in ((h, size[1]), tuple(size)):
        if step != tuple(x.shape[2:]):
            x = F.interpolate(x, size=step, mode=mode, antialias=True, align_corners=False).add_(0.5).floor_()
            if mode != "bilinear":       # bilinear weights are >= 0 and sum to 1: never outside 0..255
                x = x.clamp_(0, 255)
    return x


def check_interpolations(preprocesses, flag):
    for p in preprocesses:
        if p.interpolation not in INTERPOLATIONS:
            raise UserError(f"{flag} resizes on the device with {', '.join(INTERPOLATIONS)} only; a backbone uses "
                            f"{p.interpolation!r}: use --decode pil")


class DeviceTransform:
    """One preprocessing group's model input from decoded images (each (3, H, W) uint8 on the device): images of one
    size are resized together (short side, antialiased, the group's interpolation), centre-cropped, normalised."""

    def __init__(self, preprocess, device):
        self.p, self.norm = preprocess, Normalise(preprocess.mean, preprocess.std, device)

    def __call__(self, images, device, ready=None):
        """(n, 3, crop, crop) float32, row k from ``images[k]`` (a dict row -> uint8 image) or from ``ready`` = (rows,
        (len(rows), 3, crop, crop) tensor already normalised: the PIL path's), n rows in all."""
        # torchvision here, not at module level: importing it costs every trainer and scorer process (which import
        # this module for its flag names) as much again as torch itself
        from torchvision.transforms import functional as TF
        c = self.p.crop
        by_size, order, parts = {}, [], []
        for k, img in images.items():
            by_size.setdefault(tuple(img.shape[1:]), []).append(k)
        for rows in by_size.values():
            x = (torch.stack([images[k] for k in rows]) if len(rows) > 1 else images[rows[0]][None]).float()
            x = resample(x, short_side_size(*x.shape[2:], self.p.resize), self.p.interpolation)
            parts.append(TF.center_crop(x, [c, c]))
            order += rows
        x = self.norm(torch.cat(parts)) if parts else torch.empty((0, 3, c, c), device=device)
        if ready is not None:
            x = torch.cat([x, ready[1].to(device, non_blocking=True)])
            order += list(ready[0])
        if order == sorted(order):
            return x
        # back to row order with one gather; its index goes over from pinned memory, so the host never waits for
        # the device (a copy from pageable memory may wait for the stream)
        index = torch.from_numpy(np.argsort(order))
        return x.index_select(0, index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index)


# ---------------------------------------------------------------------------------------------------------------------
# Loader workers: file bytes, or the PIL path for what the device does not decode
# ---------------------------------------------------------------------------------------------------------------------
def device_refusal(blob, progressive=False):
    """None when ``blob`` is a JPEG the device decodes (8-bit, 3 components, Huffman-coded sequential: baseline or
    extended; progressive too when ``progressive``), else why not, in a few words (the summary's category)."""
    if blob is None:
        return "in-memory dataset, no file"
    if len(blob) < 4 or blob[:3] != b"\xff\xd8\xff":
        return "not a JPEG"
    if blob.rfind(b"\xff\xd9", max(0, len(blob) - 4096)) < 0:
        return "JPEG without end marker"
    i, adobe_rgb = 2, False
    while i + 4 <= len(blob):
        if blob[i] != 0xFF:
            break
        m = blob[i + 1]
        if m == 0xFF:                                    # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD7:               # markers without a length
            i += 2
            continue
        length = int.from_bytes(blob[i + 2:i + 4], "big")
        if m == 0xEE and blob[i + 4:i + 9] == b"Adobe" and length >= 12 and i + 15 < len(blob):
            adobe_rgb = blob[i + 15] == 0                # Adobe's transform flag 0: RGB, not YCbCr
        if m in _SOF:
            if i + 10 > len(blob):
                break
            if m == 0xC2 and not progressive:
                return "progressive JPEG"
            if m not in (0xC0, 0xC1, 0xC2):
                return "lossless or arithmetic-coded JPEG"
            if blob[i + 4] != 8:
                return "12-bit JPEG"
            if blob[i + 9] != 3 or adobe_rgb:
                return "greyscale, CMYK or RGB-coded JPEG"
            return None
        if m == 0xDA:                                    # scan data before any frame header
            break
        i += 2 + length
    return "unreadable JPEG header"


class RawImages:
    """Map-style dataset for the loader workers: per image (file bytes or None, the PIL path's tensors per group or
    None, label, why PIL, error or None)."""

    def __init__(self, source, indices, transforms, progressive=False):
        self.source, self.indices = source, np.asarray(indices)
        self.transforms, self.progressive = list(transforms), progressive

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        label = int(self.source.targets[j])
        try:
            blob = self.source.encoded(j)
        except OSError as e:
            return None, None, label, None, f"{type(e).__name__}: {e.strerror or e}"
        why = device_refusal(blob, self.progressive)
        if why is None:
            return blob, None, label, None, None
        try:
            img = self.source.image(j)
        except UNREADABLE as e:   # returned, not raised: the main process skips the row (or names it, strict)
            return None, None, label, why, f"{type(e).__name__}: {one_line(e)}"
        return None, tuple(t(img) for t in self.transforms), label, why, None


def collate_raw(items):
    """One batch as few objects (workers hand each tensor over through shared memory): the device rows' bytes
    concatenated, their lengths, the PIL rows' tensors stacked per group, and per row why PIL and any error."""
    blobs = [it[0] for it in items if it[0] is not None]
    joined = bytearray(b"".join(blobs))            # frombuffer refuses an empty buffer
    flat = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.zeros(0, dtype=torch.uint8)
    pil_rows = [k for k, it in enumerate(items) if it[1] is not None]
    pil = [torch.stack(col) for col in zip(*(items[k][1] for k in pil_rows))]
    return (flat, [len(b) for b in blobs], pil_rows, pil, torch.tensor([it[2] for it in items], dtype=torch.int64),
            [it[3] for it in items], [(k, it[4]) for k, it in enumerate(items) if it[4] is not None])


# ---------------------------------------------------------------------------------------------------------------------
# The feed
# ---------------------------------------------------------------------------------------------------------------------
def decode_jpegs(blobs, device):
    """Decoded (3, H, W) uint8 images on ``device``, None for each one the decoder refuses. One call for the batch; if
    it fails (one bad image fails it all), one call per image."""
    from torchvision.io import ImageReadMode, decode_jpeg    # looked up at call time: tests replace decode_jpeg
    if not blobs:
        return []
    try:
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out = []
        for b in blobs:
            try:
                out.append(decode_jpeg(b, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


class GpuFeed:
    """Batches for :func:`utils.extraction.extract_passes`: workers read bytes (:class:`RawImages`), the device decodes
    and preprocesses every group (:class:`DeviceTransform`); inputs are channels-last, bf16 when ``half`` (the forward
    runs under bf16 autocast: its first layer would cast them anyway)."""

    def __init__(self, source, indices, groups, device, workers=2, describe=None, half=False, progressive=False):
        self.source, self.indices, self.groups = source, np.asarray(indices), list(groups)
        self.dataset = RawImages(source, indices, [g.image_transform() for g in self.groups], progressive)
        self.workers, self._describe, self.half = workers, describe, half
        self.device = torch.device(device)
        check_interpolations(self.groups, "--decode gpu")
        self.key = {"decode": "gpu", "device": self.device.type, "progressive_on_device": progressive}
        self.counts, self.rows, self.unreadable = Counter(), 0, {}

    def __len__(self):
        return len(self.indices)

    def describe(self, row):
        return self._describe(row) if self._describe else f"row {row}"

    def batches(self, batches, device):
        """Yield (inputs per group, labels) per list of rows. A thread takes each batch from the loader and decodes it
        while this one preprocesses and runs the one before (the decoder blocks its caller until it is done)."""
        transforms = [DeviceTransform(p, device) for p in self.groups]
        loader = iter(DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                                 collate_fn=collate_raw, pin_memory=device.type == "cuda",
                                 prefetch_factor=4 if self.workers else None))
        dtype = torch.bfloat16 if self.half else torch.float32

        def fetch(rows):
            return self._decoded(rows, next(loader), device)
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(fetch, batches[0]) if batches else None
            for b in range(len(batches)):
                images, ready_rows, ready, labels = ahead.result()
                if b + 1 < len(batches):
                    ahead = pool.submit(fetch, batches[b + 1])
                yield ([t(images, device, (ready_rows, ready[g]) if ready else None)
                        .to(dtype=dtype, memory_format=torch.channels_last) for g, t in enumerate(transforms)],
                       labels.numpy())

    def _decoded(self, rows, raw, device):
        """One loader batch decoded: ({row: uint8 image on the device}, rows made by PIL, their tensors per group,
        labels); counts each image by how it was decoded."""
        flat, sizes, pil_rows, pil, labels, why, errors = raw
        bad = dict(errors)                     # rows no one could read: no bytes and no PIL tensors
        on_pil = set(pil_rows)
        dev_rows = [k for k in range(len(rows)) if k not in on_pil and k not in bad]
        ends = np.cumsum([0] + sizes)
        decoded = decode_jpegs([flat[a:b] for a, b in zip(ends[:-1], ends[1:])], device)
        images = {k: img for k, img in zip(dev_rows, decoded) if img is not None}
        refused = [k for k in dev_rows if k not in images]
        for k in refused:
            why[k] = "refused by the device's JPEG decoder"
        ready_rows, parts = list(pil_rows), [pil] if pil_rows else []
        if refused or bad:    # PIL in this process for what the device's decoder would not take; a blank per bad row
            late = refused + sorted(bad)
            ready_rows += late
            parts.append([torch.stack(col) for col in zip(*(self._pil(rows[k], k, bad) for k in late))])
        for k, err in bad.items():
            labels[k], why[k] = -1, None        # label -1: skipped (or named, strict) by the extraction
            self.unreadable[rows[k]] = err
        self.rows += len(rows) - len(bad)
        self.counts["device"] += len(images)
        self.counts.update(w for w in why if w is not None)
        return images, ready_rows, [torch.cat(per_group) for per_group in zip(*parts)] if parts else None, labels

    def _pil(self, row, k, bad):
        """The PIL path's tensors of ``row`` (batch position ``k``); an unreadable one is entered in ``bad``
        and gets a blank image's tensors in its place."""
        if k not in bad:
            try:
                return tuple(t(self.source.image(int(self.indices[row]))) for t in self.dataset.transforms)
            except UNREADABLE as e:
                bad[k] = f"{type(e).__name__}: {one_line(e)}"
        return tuple(t(Image.new("RGB", (8, 8))) for t in self.dataset.transforms)

    def why_unreadable(self, row):
        """What reading row ``row``'s file said (the extraction's skip list and --strict message)."""
        return self.unreadable.get(row, "it could not be read")

    def source_file(self, row):
        return self.source.ident(int(self.indices[row]))

    def report(self):
        """Print the decoding summary of this run's rows; return it for the entry's info."""
        pil = {w: n for w, n in sorted(self.counts.items()) if w != "device"}
        print(f"--decode gpu: {self.counts['device']} of {self.rows} images decoded on {self.device.type}, "
              f"{sum(pil.values())} with PIL" + (f" ({', '.join(f'{n} {w}' for w, n in pil.items())})" if pil else ""))
        return {"decode": {"rows": self.rows, "on_device": self.counts["device"], "with_pil": pil}}


def choose(decode, device):
    """The decode path for ``--decode`` on ``device`` (a torch.device): 'gpu' falls back to 'pil', with one line,
    where the device decodes no JPEGs."""
    if decode == "gpu" and device.type not in DEVICE_TYPES:
        why = "--device is cpu" if torch.cuda.is_available() else "no CUDA"
        print(f"--decode gpu: {why}: decoding with PIL")
        return "pil"
    return decode
