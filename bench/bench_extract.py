"""Feature-extraction throughput through the real extraction code (utils/extraction.py, writing store entries) against
the backbones' pure forward rate on ready-made device tensors, on the same device, for each decode path.

    # one backbone: pure forward, PIL path, decoded-copy build (one time) and decoded-copy path
    python -m bench.bench_extract --arch resnet50 --decode pil cache --n_images 16384 --batch_size 256 --workers 14
    # 14 backbones in one pass (each with its own weights' preprocessing: 6 distinct ones)
    python -m bench.bench_extract --many 14 --decode pil cache --n_images 4096 --batch_size 256 --workers 14
    # the three paths on ImageNet-like baseline JPEGs (the GPU measurement of issue 21)
    python -m bench.bench_extract --arch resnet50 --decode gpu pil cache --synthetic 512 --n_images 16384 \
        --batch_size 256 --workers 14

Images are JPEGs held in memory (so disk speed is not measured): the ImageNet photos of --photos (default: the 20 in
the foolbox wheel, if installed), else random-content 500 x 375 JPEGs, which are several times larger and slower to
decode than photos; every image is decoded, none is reused. The foolbox photos are progressive JPEGs, which --decode
gpu leaves to PIL; ``--synthetic N`` makes N distinct baseline JPEGs (quality 90, 4:2:0, as ImageNet's are) at
ImageNet-like sizes (:func:`imagenet_like_sizes`) out of those photos (or of smooth random content without them).
Random weights (no download), but each architecture's preprocessing is its default torchvision weights' (resize, crop,
interpolation, mean, std). The forward is bf16
autocast + channels-last on CUDA, float32 on CPU. A pass's rate includes the DataLoader's start, writing the chunks and
merging them into the store entries, as a user gets them; its steady state is the pace of the batches once the
pipeline is full (the last 80 % of them). The decoded copy's build is reported apart (done once per split).
"""
import argparse
import contextlib
import io
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from bench.common import Timer, hardware
from utils.backbones import LayerTaps, Preprocess
from utils.data import to_rgb
from utils.decode import DECODE_PATHS, GpuFeed
from utils.extraction import ExtractConfig, Output, Pass, assign_groups, extract_passes
from utils.feeds import CacheFeed, GroupedImages, ImageFeed, build_decoded_cache, plan_cache

# 14 torchvision architectures cheap enough to run together; their default weights use 6 distinct preprocessings
MANY = ["resnet50", "vit_b_16", "resnet18", "resnet34", "resnet101", "resnext50_32x4d", "densenet121",
        "convnext_tiny", "swin_t", "efficientnet_b0", "efficientnet_b1", "mobilenet_v3_large", "regnet_y_1_6gf",
        "shufflenet_v2_x1_0"]


class JpegSource:
    """In-memory JPEGs as an ImageSource: image(i) decodes blob i with PIL."""
    name, split, classes = "bench", "val", ["photo"]

    def __init__(self, blobs):
        self.blobs, self.targets = blobs, np.zeros(len(blobs), np.int64)

    def __len__(self):
        return len(self.blobs)

    def image(self, i):
        with Image.open(io.BytesIO(self.blobs[i])) as img:
            img.load()
            return to_rgb(img)

    def encoded(self, i):
        return self.blobs[i]

    def ident(self, i):
        return f"blob {i}"

    def key(self):
        return {"dataset": "bench", "n": len(self.blobs)}


def fmt(rate):
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def default_preprocess(arch):
    """The preprocessing of the architecture's default torchvision weights (read from torchvision, no download)."""
    import torchvision.models as tvm
    t = tvm.get_model_weights(arch).DEFAULT.transforms()
    return Preprocess(int(t.resize_size[0]), int(t.crop_size[0]), t.interpolation.value, tuple(t.mean), tuple(t.std))


def load_blobs(photos, n_images):
    if photos is None:
        import importlib.util
        spec = importlib.util.find_spec("foolbox")
        photos = os.path.join(os.path.dirname(spec.origin), "data") if spec else None
    blobs = [open(os.path.join(photos, f), "rb").read() for f in sorted(os.listdir(photos))
             if f.lower().endswith((".jpg", ".jpeg"))] if photos and os.path.isdir(photos) else []
    kind = f"{len(blobs)} photos from {photos}"
    if not blobs:
        rng = np.random.default_rng(0)
        for _ in range(min(n_images, 256)):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
        kind = "random-content JPEGs"
    return [blobs[i % len(blobs)] for i in range(n_images)], kind


def imagenet_like_sizes(n, seed=0):
    """(w, h) of ``n`` images, distributed roughly as ImageNet train's: the common camera sizes (500 x 375 about a
    third, 500 x 333, 375 x 500, 500 x 500, 333 x 500) for 60 %, the rest spread (long side 300-800, aspect
    1-1.67, 70 % landscape). Many distinct sizes, as on ImageNet: images of one size are resized together."""
    rng = np.random.default_rng(seed)
    common = [((500, 375), .35), ((500, 333), .10), ((375, 500), .08), ((500, 500), .04), ((333, 500), .03)]
    out = []
    for _ in range(n):
        u, acc = rng.random(), 0.0
        for size, p in common:
            acc += p
            if u < acc:
                out.append(size)
                break
        else:
            long = int(rng.integers(300, 801))
            short = int(long / rng.uniform(1.0, 5 / 3))
            out.append((long, short) if rng.random() < 0.7 else (short, long))
    return out


def synthetic_blobs(photos, n_distinct, n_images):
    """``n_distinct`` baseline JPEGs at ImageNet-like sizes cut from the photos (or smooth random content), repeated
    to ``n_images``."""
    blobs, kind = load_blobs(photos, 64)
    rng = np.random.default_rng(1)
    sources = [] if kind == "random-content JPEGs" else [Image.open(io.BytesIO(b)).convert("RGB")
                                                          for b in dict.fromkeys(blobs)]
    out = []
    for k, size in enumerate(imagenet_like_sizes(n_distinct)):
        if sources:
            img = sources[k % len(sources)].resize(size, Image.BICUBIC)
        else:
            low = rng.integers(0, 255, (9, 12, 3), dtype=np.uint8)
            img = Image.fromarray(low).resize(size, Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    what = f"{n_distinct} baseline JPEGs at ImageNet-like sizes from {kind if sources else 'smooth random content'}"
    return [out[i % len(out)] for i in range(n_images)], what


def forward_rate(model, pre, batch_size, n_batches, device):
    """Images/s of the model's forward alone, on a ready channels-last batch on the device."""
    taps = LayerTaps(model, [("pre_logits", "auto", "nchw")]).to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, pre.crop, pre.crop, device=device).to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for _ in range(2):
            taps(x)
        with Timer() as t:
            for _ in range(n_batches):
                taps(x)
    return n_batches * batch_size / t.seconds


class TimedFeed:
    """A feed that notes when each batch is handed over: their pace, once the pipeline is full, is the steady rate."""

    def __init__(self, feed):
        self.feed, self.key, self.marks = feed, feed.key, []

    def __len__(self):
        return len(self.feed)

    def describe(self, row):
        return self.feed.describe(row)

    def batches(self, batches, device):
        for rows, item in zip(batches, self.feed.batches(batches, device)):
            self.marks.append((time.perf_counter(), len(rows)))
            yield item

    def steady_rate(self):
        """Images/s over the last 80 % of the batches (start-up, the last batch and the store merge excluded)."""
        k = len(self.marks) // 5
        if len(self.marks) - k < 3:
            return float("nan")
        (t0, _), (t1, _) = self.marks[k], self.marks[-1]
        return sum(n for _, n in self.marks[k:-1]) / (t1 - t0)


def run_pass(models, source, n, decode, args, device, tmp, cache=None):
    """One extraction pass of every model over the first ``n`` images; returns (images/s of the whole pass, steady
    images/s)."""
    passes = [Pass(make=lambda m=m: LayerTaps(m, [("pre_logits", "auto", "nchw")]),
                   outputs=[Output(os.path.join(tmp, f"{decode}-{n}", arch), {"arch": arch}, {}, arch)],
                   preprocess=pre) for arch, (m, pre) in models.items()]
    groups = assign_groups(passes)
    idx = np.arange(n)
    if decode == "pil":
        feed = ImageFeed(GroupedImages(source, idx, [g.image_transform() for g in groups]), args.workers)
    elif decode == "gpu":
        feed = GpuFeed(source, idx, groups, device, args.workers, half=device.type == "cuda")
    else:
        images, labels, plan = cache
        feed = CacheFeed(images[:n], labels[:n], plan, groups, threads=args.workers)
    opts = ExtractConfig(batch_size=args.batch_size, workers=args.workers, chunk_size=50000, dtype="float32",
                         device=str(device), amp=True)
    feed = TimedFeed(feed)
    with Timer() as t, contextlib.redirect_stdout(io.StringIO()):
        extract_passes(passes, feed, {"bench": n, "decode": decode}, opts, desc=f"{decode} pass")
    shutil.rmtree(os.path.join(tmp, f"{decode}-{n}"), ignore_errors=True)
    return n / t.seconds, feed.steady_rate(), feed.feed


def nvjpeg_rate(blobs, batch_size):
    """GPU JPEG decoding alone (torchvision.io.decode_jpeg on CUDA), for reference; None when unavailable."""
    from torchvision.io import decode_jpeg
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        decode_jpeg(data[:batch_size], device="cuda")
        with Timer() as t:
            for i in range(0, len(data), batch_size):
                decode_jpeg(data[i:i + batch_size], device="cuda")
    except Exception as e:  # a missing nvJPEG build is reported, not fatal
        return f"unavailable ({type(e).__name__}: {str(e)[:80]})"
    return f"{len(data) / t.seconds:.0f} images/s"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", help="torchvision architecture (one backbone per pass)")
    p.add_argument("--many", type=int, default=0, help=f"instead: this many backbones in one pass (≤ {len(MANY)}, "
                                                       f"the first of {', '.join(MANY)})")
    p.add_argument("--decode", nargs="+", default=["pil", "cache"], choices=list(DECODE_PATHS),
                   help="the paths to time, in this order")
    p.add_argument("--n_images", type=int, default=1024, help="images of the decoded-copy pass")
    p.add_argument("--pil_images", type=int, default=None,
                   help="images of the PIL pass (default: --n_images; fewer keeps a slow path's run short)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--forward_batches", type=int, default=8, help="timed batches of each pure forward")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--photos", default=None, help="a folder of JPEG photos to use")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="N distinct baseline JPEGs at ImageNet-like sizes made from the photos, instead of them")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    archs = MANY[:args.many] if args.many else [args.arch]
    n_pil = min(args.pil_images or args.n_images, args.n_images)
    if args.synthetic:
        blobs, kind = synthetic_blobs(args.photos, args.synthetic, args.n_images)
    else:
        blobs, kind = load_blobs(args.photos, args.n_images)
    print(f"{len(archs)} backbone(s) per pass, {args.n_images} images ({kind}, "
          f"{np.mean([len(b) for b in blobs]) / 1024:.0f} KiB on average), batch {args.batch_size}, "
          f"{args.workers} loader workers, on {device}")
    print(f"hardware: {hardware()}")
    import torchvision.models as tvm
    models = {}
    for arch in archs:
        torch.manual_seed(0)
        with torch.device(device):
            models[arch] = (tvm.get_model(arch, weights=None).eval(), default_preprocess(arch))
    rates = {}
    for arch, (m, pre) in models.items():
        rates[arch] = forward_rate(m, pre, args.batch_size, args.forward_batches, device)
        print(f"pure forward {arch} ({pre.resize}/{pre.crop} {pre.interpolation}): {fmt(rates[arch])} images/s")
    pure = 1 / sum(1 / r for r in rates.values())
    if len(archs) > 1:
        print(f"pure forward of the {len(archs)} back to back: {fmt(pure)} images/s")
    what = f"the {len(archs)} backbones' forward rate" if len(archs) > 1 else f"{archs[0]}'s forward rate"
    source = JpegSource(blobs)
    tmp = tempfile.mkdtemp(prefix="bench_extract_")
    try:
        for decode in args.decode:
            if decode == "pil":
                rate, steady, _ = run_pass(models, source, n_pil, "pil", args, device, tmp)
                print(f"pass, decode=pil ({n_pil} images, PIL decode + preprocess in {args.workers} workers): "
                      f"{fmt(rate)} images/s = {100 * rate / pure:.0f} % of {what}; steady state {fmt(steady)} "
                      f"images/s = {100 * steady / pure:.0f} %")
            elif decode == "gpu":
                rate, steady, feed = run_pass(models, source, args.n_images, "gpu", args, device, tmp)
                pil = sum(n for w, n in feed.counts.items() if w != "device")
                print(f"pass, decode=gpu ({args.n_images} images, bytes read in {args.workers} workers, "
                      f"{feed.counts['device']} decoded on {device.type}, {pil} with PIL): {fmt(rate)} images/s = "
                      f"{100 * rate / pure:.0f} % of {what}; steady state {fmt(steady)} images/s = "
                      f"{100 * steady / pure:.0f} %")
            else:
                plan = plan_cache([pre for _, pre in models.values()])
                path = os.path.join(tmp, "decoded")
                with Timer() as t, contextlib.redirect_stdout(io.StringIO()):
                    images, labels = build_decoded_cache(path, source, np.arange(args.n_images), {"bench": 1}, plan,
                                                         args.workers)
                size = images.nbytes / 2 ** 20
                print(f"decoded copy, built once ({plan.resize}/{plan.crop} {plan.interpolation}, {size:.0f} MiB): "
                      f"{fmt(args.n_images / t.seconds)} images/s")
                rate, steady, _ = run_pass(models, source, args.n_images, "cache", args, device, tmp,
                                           (images, labels, plan))
                print(f"pass, decode=cache ({args.n_images} images): {fmt(rate)} images/s = "
                      f"{100 * rate / pure:.0f} % of {what}; steady state {fmt(steady)} images/s = "
                      f"{100 * steady / pure:.0f} %")
                shutil.rmtree(path, ignore_errors=True)
        if device.type == "cuda" and len(archs) == 1:
            print(f"for reference, nvJPEG decoding alone on the GPU (no resize): "
                  f"{nvjpeg_rate(blobs[:min(len(blobs), 4096)], args.batch_size)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
