"""Feature-extraction throughput: the full path (JPEG decode, preprocessing in DataLoader workers, transfer, bf16
forward, pooling) against the backbone's pure forward rate on ready-made device tensors, on the same device.

    python -m bench.bench_extract --arch resnet50 --n_images 8192 --batch_size 256 --workers 12

Images are JPEGs held in memory (so disk speed is not measured): the ImageNet photos of --photos (default: the 20 in
the foolbox wheel, if installed), else random-content 500 x 375 JPEGs, which are several times larger and slower to
decode than photos. Random weights: no download. Prints the forward rate, the loader alone and the full path.
"""
import argparse
import io
import os

import numpy as np
import torch
from PIL import Image

from bench.common import Timer, hardware
from utils.backbones import BackboneSpec, Backbone, FeatureExtractor, iter_features


class Jpegs:
    """In-memory JPEGs, decoded and preprocessed by PIL in the loader workers."""

    def __init__(self, blobs, transform):
        self.blobs, self.transform = blobs, transform

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        with Image.open(io.BytesIO(self.blobs[i])) as img:
            return self.transform(img.convert("RGB")), 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", help="torchvision architecture")
    p.add_argument("--n_images", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--photos", default=None, help="a folder of JPEG photos to use")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bb = Backbone(BackboneSpec(name=args.arch, source="torchvision", arch=args.arch, weights="none"))
    ext = FeatureExtractor(bb.model.to(device), "pre_logits").to(memory_format=torch.channels_last)
    photos = args.photos
    if photos is None:
        import importlib.util
        spec = importlib.util.find_spec("foolbox")
        photos = os.path.join(os.path.dirname(spec.origin), "data") if spec else None
    blobs = [open(os.path.join(photos, f), "rb").read() for f in sorted(os.listdir(photos))
             if f.lower().endswith((".jpg", ".jpeg"))] if photos and os.path.isdir(photos) else []
    kind = f"{len(blobs)} photos from {photos}"
    if not blobs:
        rng = np.random.default_rng(0)
        for _ in range(min(args.n_images, 256)):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
        kind = "random-content JPEGs"
    blobs = [blobs[i % len(blobs)] for i in range(args.n_images)]
    print(f"{args.arch}, {args.n_images} images ({kind}, {np.mean([len(b) for b in blobs]) / 1024:.0f} KiB on "
          f"average), batch {args.batch_size}, {args.workers} loader workers, on {device}")
    print(f"hardware: {hardware()}")

    x = torch.randn(args.batch_size, 3, bb.preprocess.crop, bb.preprocess.crop, device=device)
    x = x.to(memory_format=torch.channels_last)
    n_batches = max(1, args.n_images // args.batch_size)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for _ in range(3):
            ext(x)
        with Timer() as t_pure:
            for _ in range(n_batches):
                ext(x)
    pure = n_batches * args.batch_size / t_pure.seconds

    batches = [list(range(i, min(i + args.batch_size, len(blobs)))) for i in range(0, len(blobs), args.batch_size)]
    print(f"pure forward: {pure:.0f} images/s")
    from torch.utils.data import DataLoader
    with Timer() as t_load:
        n = sum(len(y) for _, y in DataLoader(Jpegs(blobs, bb.preprocess.image_transform()), batch_sampler=batches,
                                              num_workers=args.workers))
    print(f"PIL loader alone (decode + preprocess, no forward): {n / t_load.seconds:.0f} images/s")
    data = Jpegs(blobs, bb.preprocess.image_transform())
    for _ in iter_features(ext, data, batches[:2], args.workers, device):
        pass
    with Timer() as t_full:
        n = sum(len(y) for _, y in iter_features(ext, data, batches, args.workers, device))
    full = n / t_full.seconds
    print(f"full extraction: {full:.0f} images/s = {100 * full / pure:.0f} % of the forward rate")


if __name__ == "__main__":
    main()
