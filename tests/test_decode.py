"""--decode gpu (utils/decode.py), run on the CPU: the same code with torchvision's CPU JPEG decoder in place of nvJPEG
and the same torch resize / crop / normalise, so everything but the CUDA call is exercised. Its inputs and features
against the PIL path's on real photos, which files fall back to PIL and how they are counted, corrupt files, keys."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from concept_extractor import dataset_feature_extractor as dfe
from test_backbones import foolbox_images
from utils import cli, decode, store
from utils.backbones import Backbone, Preprocess
from utils.data import load_image
from utils.errors import UserError
from utils.layout import model_folder
from utils.specs import load_spec

LOADER = ["--workers", "0", "--batch_size", "4", "--chunk_size", "5"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def extract(*argv):
    dfe.main(dfe.get_args_parser().parse_args(list(argv)))


class Photos:
    """Image files as an ImageSource: what the gpu feed and the PIL path read."""
    name, split = "photos", "val"

    def __init__(self, files):
        self.files, self.targets = list(files), np.zeros(len(files), np.int64)

    def image(self, i):
        return load_image(self.files[i])

    def encoded(self, i):
        with open(self.files[i], "rb") as f:
            return f.read()

    def ident(self, i):
        return os.path.basename(self.files[i])


def jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def device_inputs(files, preprocesses, progressive=True, half=False):
    """One batch of every file through the gpu feed on the CPU: (inputs per group, the feed)."""
    feed = decode.GpuFeed(Photos(files), np.arange(len(files)), preprocesses, "cpu", workers=0, half=half,
                          progressive=progressive)
    (xs, _), = list(feed.batches([list(range(len(files)))], torch.device("cpu")))
    return xs, feed


def grey_levels(x, ref, p):
    """|Δ| of two normalised batches in 0..255 grey levels."""
    return ((x.float() - ref) * torch.tensor(p.std).view(1, 3, 1, 1) * 255).abs()


@torch.no_grad()
def test_device_path_matches_the_pil_path_on_the_imagenet_photos():
    """The 20 ImageNet photos (512 x 512 and 1024 x 683 progressive JPEGs, decoded here by libjpeg-turbo through
    torchvision) for EfficientNet-Lite0 with its real weights (256/224 bicubic). Measured: inputs within one grey
    level (3 values in a million differ at all), features' min cosine 0.9999998, top-1 the same for all 20."""
    files = foolbox_images()
    bb = Backbone(load_spec("efficientnet_lite0"))
    ext, head, p = bb.extractor(), bb.model.get_classifier(), bb.preprocess
    (x,), feed = device_inputs(files, [p])
    ref = torch.stack([p.image_transform()(load_image(f)) for f in files])
    assert x.shape == ref.shape == (20, 3, 224, 224) and x.is_contiguous(memory_format=torch.channels_last)
    grey = grey_levels(x, ref, p)
    assert grey.max() <= 1.0 + 1e-4 and (grey > 0.5).float().mean() < 1e-4, (grey.max(), (grey > 0.5).float().mean())
    f, r = ext(x), ext(ref.contiguous(memory_format=torch.channels_last))
    assert torch.nn.functional.cosine_similarity(f, r, dim=1).min() > 0.99999
    assert torch.equal(head(f).argmax(1), head(r).argmax(1))
    assert feed.counts == {"device": 20} and feed.rows == 20


def test_resize_crop_and_groups_follow_torchvision_on_odd_sizes(tmp_path):
    """Portrait, landscape, odd and smaller-than-crop (upsampled) images, three preprocessings in one batch (each its
    own short-side resize, interpolation and crop), bf16 when asked: within two grey levels of the PIL path, with at
    most 2 % of the values off at all."""
    photo = load_image(foolbox_images()[10])                     # the 1024 x 683 one
    files = []
    for k, size in enumerate([(500, 375), (375, 500), (333, 301), (97, 131), (640, 427), (224, 224), (500, 375)]):
        files.append(tmp_path / f"{k}.jpg")
        files[-1].write_bytes(jpeg(photo.resize(size, Image.BICUBIC)))
    groups = [Preprocess(256, 224, "bilinear", MEAN, STD), Preprocess(232, 224, "bilinear", MEAN, STD),
              Preprocess(256, 224, "bicubic", (0.5,) * 3, (0.5,) * 3), Preprocess(160, 144, "nearest", MEAN, STD)]
    xs, _ = device_inputs([str(f) for f in files], groups, progressive=False)
    for p, x in zip(groups, xs):
        ref = torch.stack([p.image_transform()(load_image(str(f))) for f in files])
        assert x.shape == ref.shape == (len(files), 3, p.crop, p.crop), p
        grey = grey_levels(x, ref, p)
        assert grey.max() <= 2.0 + 1e-4 and (grey > 0.5).float().mean() < 0.02, (p, grey.max(), grey.mean())
    (half,), _ = device_inputs([str(f) for f in files[:2]], groups[:1], progressive=False, half=True)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(half, xs[0][:2].to(torch.bfloat16))


def test_which_files_the_device_decodes():
    photo = scene(64, 48, 0)
    base = jpeg(photo)
    assert decode.device_refusal(base) is None
    assert decode.device_refusal(jpeg(photo, progressive=True)) == "progressive JPEG"
    assert decode.device_refusal(jpeg(photo, progressive=True), progressive=True) is None
    assert decode.device_refusal(jpeg(photo.convert("L"))) == "greyscale, CMYK or RGB-coded JPEG"
    assert decode.device_refusal(jpeg(photo.convert("CMYK"))) == "greyscale, CMYK or RGB-coded JPEG"
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert decode.device_refusal(png.getvalue()) == "not a JPEG"
    assert decode.device_refusal(base[:len(base) // 2]) == "JPEG without end marker"
    assert decode.device_refusal(b"") == "not a JPEG" and decode.device_refusal(None) == "in-memory dataset, no file"
    sof = base.index(b"\xff\xc0")
    assert decode.device_refusal(base[:sof + 4] + b"\x0c" + base[sof + 5:]) == "12-bit JPEG"
    assert decode.device_refusal(base[:sof + 1] + b"\xc3" + base[sof + 2:]) == "lossless or arithmetic-coded JPEG"
    assert decode.device_refusal(b"\xff\xd8\xff\xe0garbage\xff\xd9") == "unreadable JPEG header"


def small_model(tmp_path):
    """A fast random-weights backbone (256/224 bilinear, as resnet18 without weights)."""
    path = tmp_path / "mnv3.yaml"
    path.write_text("name: mnv3\nsource: torchvision\narch: mobilenet_v3_small\nweights: none\n")
    return str(path)


def scene(w, h, seed):
    """Photo-like content without photos: smooth colour fields (upsampled noise) and a sharp-edged block."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.asarray(img).copy()
    a[h // 4:h // 2, w // 3:w // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(a)


def mixed_folder(root):
    """val/ of a 2-class ImageFolder: 3 baseline JPEGs (the device's), a PNG, a greyscale, a CMYK and a progressive
    JPEG (PIL's)."""
    files = {"a/0.jpg": jpeg(scene(120, 90, 0)), "a/1.jpg": jpeg(scene(90, 130, 1)),
             "a/3.jpg": jpeg(scene(100, 100, 3).convert("L")), "b/4.jpg": jpeg(scene(80, 110, 4).convert("CMYK")),
             "b/5.jpg": jpeg(scene(110, 80, 5), progressive=True), "b/6.jpg": jpeg(scene(64, 64, 6))}
    for name, data in files.items():
        os.makedirs(root / "val" / name[0], exist_ok=True)
        (root / "val" / name).write_bytes(data)
    scene(70, 90, 2).save(root / "val" / "a" / "2.png")
    return str(root)


@pytest.fixture
def device_on_cpu(monkeypatch):
    """Let --decode gpu use the CPU's JPEG decoder, so the script's device path runs here."""
    monkeypatch.setattr(decode, "DEVICE_TYPES", ("cuda", "cpu"))


def pil_and_gpu_runs(tmp_path, device, capsys):
    """The mixed folder through two backbones of two preprocessings (bilinear 256, bicubic 256) in one pass, by the
    PIL path and by --decode gpu: (what the gpu run printed, {tag: (PIL entry, its meta, gpu entry, its meta)})."""
    folder = mixed_folder(tmp_path / "mixed")
    common = ["--model_config", small_model(tmp_path), "efficientnet_lite0", "--weights", "none", "--dataset", folder,
              "--split", "val", "--device", device, *LOADER]
    extract(*common, "--out", str(tmp_path / "pil"))
    capsys.readouterr()
    extract(*common, "--out", str(tmp_path / "gpu"), "--decode", "gpu")
    return capsys.readouterr().out, {tag: store.read(str(tmp_path / "pil" / tag / "val"))
                                     + store.read(str(tmp_path / "gpu" / tag / "val"))
                                     for tag in (model_folder(m, weights="none")      # <model>+none
                                                 for m in ("mnv3", "efficientnet_lite0"))}


def cosines(a, b):
    fa, fb = np.asarray(a["features"]), np.asarray(b["features"])
    return (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)


def test_fallbacks_are_counted_and_give_the_pil_paths_features(tmp_path, device_on_cpu, capsys):
    out, entries = pil_and_gpu_runs(tmp_path, "cpu", capsys)
    assert out.count("--decode gpu: 3 of 7 images decoded on cpu, 4 with PIL (2 greyscale, CMYK or RGB-coded JPEG, "
                     "1 not a JPEG, 1 progressive JPEG)") == 1
    for tag, (a, ma, b, mb) in entries.items():
        assert mb["info"]["decode"] == {"rows": 7, "on_device": 3, "with_pil": {
            "greyscale, CMYK or RGB-coded JPEG": 2, "not a JPEG": 1, "progressive JPEG": 1}}
        assert mb["key"]["decode"] == {"decode": "gpu", "device": "cpu", "progressive_on_device": False}
        assert "decode" not in ma["key"] and ma["key_hash"] != mb["key_hash"]
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_array_equal(a["indices"], b["indices"])
        pil_rows = [2, 3, 4, 5]                          # 2.png, 3.jpg grey, 4.jpg CMYK, 5.jpg progressive
        np.testing.assert_allclose(b["features"][pil_rows], a["features"][pil_rows], rtol=1e-5, atol=1e-6)
        assert cosines(a, b).min() > 0.999, (tag, cosines(a, b))


def test_a_jpeg_the_decoder_refuses_goes_to_pil_alone(tmp_path, device_on_cpu, monkeypatch, capsys):
    """A decoder failure fails its whole batch (nvJPEG's batched call does): the batch is decoded again image by
    image, and only the refused one goes to PIL, in this process."""
    import torchvision.io
    folder = mixed_folder(tmp_path / "mixed")
    refuse = (tmp_path / "mixed" / "val" / "b" / "6.jpg").read_bytes()
    real, calls = torchvision.io.decode_jpeg, []

    def picky(data, **kw):
        calls.append(len(data) if isinstance(data, list) else 1)
        if any(bytes(d.numpy()) == refuse for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("Error while decoding JPEG images")
        return real(data, **kw)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    common = ["--model_config", small_model(tmp_path), "--weights", "none", "--dataset", folder, "--split", "val",
              "--device", "cpu", *LOADER]
    extract(*common, "--out", str(tmp_path / "gpu"), "--decode", "gpu")
    assert "refused by the device's JPEG decoder" in capsys.readouterr().out
    # batches of 4 rows: [0 1 2 3] holds two device JPEGs (one call); [4 5 6] holds 6.jpg: one call, then one alone
    assert calls == [2, 1, 1]
    b, mb = store.read(str(tmp_path / "gpu"))
    assert mb["info"]["decode"]["on_device"] == 2
    assert mb["info"]["decode"]["with_pil"]["refused by the device's JPEG decoder"] == 1
    extract(*common, "--out", str(tmp_path / "pil"))
    a, _ = store.read(str(tmp_path / "pil"))
    np.testing.assert_allclose(b["features"][6], a["features"][6], rtol=1e-5, atol=1e-6)


def bad_huffman_table(blob):
    """A JPEG whose header passes the device's check but whose first Huffman table no decoder accepts."""
    i = blob.index(b"\xff\xc4")
    return blob[:i + 5] + b"\xff" * 16 + blob[i + 21:]


@pytest.mark.parametrize("bad", ["garbage", "truncated", "bad Huffman table"])
def test_a_corrupt_file_is_skipped_or_named_as_the_pil_path_does(tmp_path, device_on_cpu, monkeypatch, capsys, bad):
    """Garbage and a truncated file go to PIL in the worker (not a JPEG the device takes), the bad table to the device
    decoder, which refuses it, then to PIL in this process. Either way the file is skipped and listed as the PIL path
    skips it (the same rows, labels and indices); with --strict it stops the run with one line naming it."""
    folder = mixed_folder(tmp_path / "mixed")
    good = (tmp_path / "mixed" / "val" / "a" / "0.jpg").read_bytes()
    (tmp_path / "mixed" / "val" / "b" / "bad.jpg").write_bytes(
        {"garbage": b"\xff\xd8\xff\xe0garbage", "truncated": good[:len(good) // 2],
         "bad Huffman table": bad_huffman_table(good)}[bad])
    common = ["--model_config", small_model(tmp_path), "--weights", "none", "--dataset", folder, "--split", "val",
              "--device", "cpu", *LOADER]
    extract(*common, "--out", str(tmp_path / "pil"))
    extract(*common, "--out", str(tmp_path / "gpu"), "--decode", "gpu")
    (a, ma), (b, mb) = store.read(str(tmp_path / "pil")), store.read(str(tmp_path / "gpu"))
    np.testing.assert_array_equal(a["indices"], np.arange(7))       # bad.jpg is row 7 of 8
    np.testing.assert_array_equal(a["indices"], b["indices"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert ma["info"]["skipped"] == mb["info"]["skipped"] == {
        "count": 1, "files": [{"file": "b/bad.jpg", "row": 7, "error": "OSError"}]}
    assert mb["info"]["decode"]["rows"] == 7
    capsys.readouterr()
    monkeypatch.setattr("sys.argv", ["dataset_feature_extractor.py", *common, "--out", str(tmp_path / "strict"),
                                     "--decode", "gpu", "--strict"])
    with pytest.raises(SystemExit) as stop:
        cli.run(dfe.main, dfe.get_args_parser())
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error")]   # the rest: the bar
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: image 7 of ") and "(b/bad.jpg) is unreadable (OSError" in lines[0], lines
    assert "replace or remove the file" in lines[0]
    assert not os.path.exists(tmp_path / "strict")


def test_a_gpu_entry_is_never_taken_for_a_pil_one(tmp_path, device_on_cpu, capsys):
    folder = mixed_folder(tmp_path / "mixed")
    common = ["--model_config", small_model(tmp_path), "--weights", "none", "--dataset", folder, "--split", "val",
              "--device", "cpu", "--out", str(tmp_path / "e"), *LOADER]
    extract(*common, "--decode", "gpu")
    gpu = store.read(str(tmp_path / "e"))[1]["key_hash"]
    capsys.readouterr()
    extract(*common)                                    # the PIL path over the same folder: extracted afresh
    assert "up to date" not in capsys.readouterr().out
    assert store.read(str(tmp_path / "e"))[1]["key_hash"] != gpu
    extract(*common)
    assert "up to date" in capsys.readouterr().out


def test_without_cuda_the_flag_says_so_once_and_writes_the_pil_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = mixed_folder(tmp_path / "mixed")
    common = ["--model_config", small_model(tmp_path), "--weights", "none", "--dataset", folder, "--split", "val",
              *LOADER]
    extract(*common, "--out", str(tmp_path / "gpu"), "--decode", "gpu")
    out = capsys.readouterr().out
    assert out.count("--decode gpu: no CUDA: decoding with PIL") == 1 and out.count("--decode gpu") == 1
    extract(*common, "--out", str(tmp_path / "pil"))
    for f in ("features.npy", "labels.npy", "indices.npy", "meta.json"):
        assert (tmp_path / "gpu" / f).read_bytes() == (tmp_path / "pil" / f).read_bytes(), f


def test_an_unsupported_interpolation_is_refused():
    with pytest.raises(UserError, match="--decode gpu resizes on the device with bilinear, bicubic, nearest only"):
        decode.GpuFeed(Photos([]), [], [Preprocess(256, 224, "lanczos", MEAN, STD)], "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by bench/gpu_check.sh issue21)")
def test_on_cuda_the_script_decodes_with_nvjpeg(tmp_path, capsys):
    """The real thing: nvJPEG, pinned batches, bf16 inputs under autocast, against the PIL path on the same GPU."""
    out, entries = pil_and_gpu_runs(tmp_path, "cuda", capsys)
    assert "--decode gpu: 3 of 7 images decoded on cuda, 4 with PIL" in out
    for tag, (a, _, b, mb) in entries.items():
        assert mb["key"]["decode"]["device"] == "cuda" and mb["info"]["decode"]["on_device"] == 3
        cos = cosines(a, b)
        assert cos[[2, 3, 4, 5]].min() > 0.9999, (tag, cos)      # PIL's rows: the same inputs
        assert cos.min() > 0.99, (tag, cos)                      # nvJPEG's: its IDCT, and bf16 in the forward
