"""Explain predictions of a trained run with its concepts, and show what each concept is.

    # why did the head at sparsity 0.9 classify val image 17 as it did?
    python explain.py outputs/runs/fashion_mnist/efficientnet_lite0/prototype_segments --index 17 --ratio 0.9
    # any image file (embedded with the run's backbone)
    python explain.py outputs/runs/fashion_mnist/efficientnet_lite0/prototype_segments --image shoe.png
    # a concept gallery: each concept's element image (or words) and the val images that activate it most
    python explain.py outputs/runs/fashion_mnist/efficientnet_lite0/prototype_segments --gallery

A concept's contribution to the predicted class is its masked activation times its weight for that class; they sum,
with the class bias, to the class logit. Output (default <run>/explanations/): explain_<name>.png and .html, or
gallery.png and gallery.html, with every image they show copied under assets/.
"""
import argparse
import html
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image

from utils import cli, store, sweep, validate
from utils.backbones import Backbone
from utils.data import get_source, load_image
from utils.errors import UserError
from utils.explanations import Run, contributions, evidence, responds_to
from utils.fileio import atomic_write_bytes
from utils.report import pyplot, save_png
from utils.specs import BackboneSpec


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder (results.json + heads.pt)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--index", type=int, help="row of the run's val features to explain")
    what.add_argument("--image", help="an image file to explain")
    what.add_argument("--gallery", action="store_true", help="make the concept gallery")
    p.add_argument("--ratio", type=float, default=0.9, help="sparsity ratio of the head to use (its best lr)")
    p.add_argument("--lr", type=float, default=None, help="a specific lr instead of the best")
    p.add_argument("--top", type=int, default=8, help="concepts shown per explanation")
    p.add_argument("--concepts", type=int, default=12, help="gallery: concepts shown (the most used by the head)")
    p.add_argument("--per_concept", type=int, default=6, help="gallery: top-activating val images per concept")
    p.add_argument("--out", default=None, help="output folder (default: <run>/explanations)")
    p.add_argument("--verify", action="store_true", default=None,
                   help="also re-hash the val features and compare with the digest recorded when they were written "
                        "(default: the IIS_VERIFY environment variable; structure, finite values, labels and indices "
                        "are always checked)")
    return p


class Page:
    """An HTML page whose images are copied into <out>/assets/ so the page stands on its own."""

    def __init__(self, out, title):
        self.out, self.parts = out, [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
                                     "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;"
                                     "border-bottom:1px solid #ddd;vertical-align:middle}img{image-rendering:auto}"
                                     "</style>", f"<h1>{html.escape(title)}</h1>"]
        os.makedirs(os.path.join(out, "assets"), exist_ok=True)

    def image(self, img_or_path, name, size=96, mark=None):
        """An <img> of the image at ``size`` px: an image smaller than that (a 28-px Fashion-MNIST crop) is stored
        upsampled by pixel repetition, so it is sharp rather than blurred by the browser; ``mark`` is a caption."""
        rel = os.path.join("assets", name)
        img = Image.open(img_or_path) if isinstance(img_or_path, str) else img_or_path
        if max(img.size) < size:
            scale = -(-size // max(img.size))      # whole pixel repetition: every source pixel the same square
            img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST).save(os.path.join(self.out, rel))
        elif isinstance(img_or_path, str):
            shutil.copyfile(img_or_path, os.path.join(self.out, rel))
        else:
            img.save(os.path.join(self.out, rel))
        tag = f"<img src='{rel}' width={size} height={size} alt='{html.escape(name)}'>"
        return tag + (f"<br><small><b>{html.escape(mark)}</b></small>" if mark else "")

    def add(self, s):
        self.parts.append(s)

    def write(self, name):
        path = os.path.join(self.out, name)
        atomic_write_bytes(path, "\n".join(self.parts).encode())
        return os.path.abspath(path)


def val_data(run, verify=None):
    """The run's val features, labels, dataset indices and image source, after the checks of utils/validate.py:
    the entry's structure (and digests on request), finite features of the run's dimension, labels of the run's
    classes, indices inside the dataset, all streamed over the memory map before anything is loaded."""
    entry = run.meta.get("inputs", {}).get("val")
    if not entry or not os.path.isdir(entry):
        raise UserError(f"the run's val features ({entry}) are gone; re-extract them")
    arrays, meta = sweep.load_split(entry, verify, dim=run.meta.get("feature_dim"), dim_of="the run's heads")
    validate.require_arrays(entry, arrays, ("indices",))
    info = meta["info"]
    if info["classes"] != run.classes:
        raise UserError(f"{entry}: its class list differs from the run's ({len(info['classes'])} vs "
                            f"{len(run.classes)} classes)")
    source = get_source(info["dataset"], "val", info.get("data_root", "data"))
    validate.check_labels(entry, "indices", arrays["indices"], len(source),
                          f"the {info['dataset']} val split has {len(source)} images")
    return np.asarray(arrays["features"]), np.asarray(arrays["labels"]), np.asarray(arrays["indices"]), source


def embed_image(run, path):
    train = store.read_meta(run.meta["inputs"]["train"])
    bb = Backbone(BackboneSpec(**train["info"]["backbone"]))
    with torch.no_grad():
        x = bb.preprocess.image_transform()(load_image(path))[None]
        return bb.extractor()(x)[0].numpy()


BACKGROUND = "mostly background"


def concept_cell(run, page, h, k, tag, responds=None):
    """A concept: its element image(s) (all of an End-to-end concept's), where they were cut from, what the concept
    responds to, and a mark when it is mostly background."""
    paths = run.element_paths(h, k)
    name = html.escape(run.concept_name(h, k))
    if not paths:
        return f"<b>{name}</b>" + (f"<br><small>responds to: {html.escape(responds)}</small>" if responds else "")
    imgs = "".join(page.image(p, f"{tag}_concept{k}_{j}.png", 96 if j == 0 else 48) for j, p in enumerate(paths))
    bg = f"<br><b style='color:#b00'>{BACKGROUND}</b>" if run.is_background(h, k) else ""
    many = f"<br><small>{len(paths)} elements assigned</small>" if len(paths) > 1 else ""
    return (imgs + f"<br><small>{name}</small>" + many + bg +
            (f"<br><small>responds to: {html.escape(responds)}</small>" if responds else ""))


def explain_one(run, h, x, img, label, name, args, out, val=None):
    """The explanation of one sample's prediction by head ``h``; ``val`` (features, labels) of the val set, when
    available, says what each shown concept responds to."""
    pred, logits, contrib, order = contributions(run, h, x)
    top = [int(k) for k in order[:args.top]]
    _, masked, _ = run.activations(h, x[None])
    w = run.t["concept.weight"][h][:, pred]
    ratio, lr = run.grid[h]
    second = int(torch.argsort(logits, descending=True)[1]) if len(logits) > 1 else None
    responds = {}
    if val is not None:
        acts, _, _ = run.activations(h, val[0])
        responds = {k: responds_to(acts[:, k], val[1], run.classes) for k in top}
    title = f"{name}: predicted {run.classes[pred]}" + (f", true {run.classes[label]}" if label is not None else "")

    plt = pyplot()
    n = len(top)
    fig = plt.figure(figsize=(2.2 * (n + 1), 3.4), dpi=110)
    ax = fig.add_subplot(1, n + 1, 1)
    ax.imshow(img, interpolation="nearest")
    ax.set_title(f"pred: {run.classes[pred]}" + (f"\ntrue: {run.classes[label]}" if label is not None else "") +
                 (f"\nrunner-up: {run.classes[second]}" if second is not None else ""), fontsize=8)
    ax.axis("off")
    for j, k in enumerate(top):
        ax = fig.add_subplot(1, n + 1, j + 2)
        path = run.element_path(h, k)
        if path:
            ax.imshow(Image.open(path), interpolation="nearest")
        else:
            ax.text(0.5, 0.5, run.concept_name(h, k).replace(" ", "\n"), ha="center", va="center", fontsize=10,
                    wrap=True)
        a_k, w_k = float(masked[0, k]), float(w[k])
        kind = "" if a_k * w_k == 0 else ("absence" if a_k < 0 else "presence")
        bg = " [background]" if run.is_background(h, k) else ""
        ax.set_title(f"{run.concept_name(h, k) if path else ''}{bg}\n{float(contrib[k]):+.2f} = "
                     f"{a_k:.2f} x {w_k:.2f} ({kind})", fontsize=6.5)
        ax.axis("off")
    fig.suptitle(f"{title}   (head s={ratio:g}, lr={lr:g}; contribution = activation x weight; a negative "
                 f"activation x a negative weight is absence evidence)", fontsize=8)
    fig.tight_layout()
    png = save_png(fig, os.path.join(out, f"explain_{name}.png"))

    page = Page(out, title)
    page.add(f"<p>{page.image(img, f'{name}_input.png', 160)}</p>")
    page.add(f"<p>Head: {html.escape(run.meta['concept_type'])} concepts at sparsity {ratio:g} (lr {lr:g}), "
             f"{run.meta['backbone']} @ {run.meta['layer']}. Logit of {html.escape(run.classes[pred])} = "
             f"{float(logits[pred]):.3f} = sum of contributions {float(contrib.sum()):.3f} + bias "
             f"{float(run.t['concept.bias'][h][pred]):.3f}." +
             (f" Runner-up: {html.escape(run.classes[second])} (logit {float(logits[second]):.3f}, "
              f"{float(logits[pred] - logits[second]):.3f} below)." if second is not None else "") + "</p>")
    page.add("<p><small>A contribution is the concept's activation (after masking) times the class's weight for it. "
             "Positive activation: the image looks like the concept. A <b>negative activation times a negative "
             "weight</b> is a positive contribution from <b>absence</b>: the image does <i>not</i> look like a concept "
             "whose presence counts against this class. 'responds to' lists the classes of the 10 val images that "
             f"activate the concept most; 'cut from' is the class of the image its element came from. "
             f"<b style='color:#b00'>{BACKGROUND}</b>: the element is mostly padding, one constant region or "
             "near-black.</small>"
             "</p>")
    page.add("<table><tr><th>rank</th><th>concept</th><th>activation</th><th>weight</th><th>contribution</th>"
             "<th>evidence</th></tr>")
    for j, k in enumerate(top):
        page.add(f"<tr><td>{j + 1}</td><td>{concept_cell(run, page, h, k, name, responds.get(k))}</td>"
                 f"<td>{float(masked[0, k]):.3f}</td><td>{float(w[k]):.3f}</td><td>{float(contrib[k]):+.3f}</td>"
                 f"<td><small>{html.escape(evidence(float(masked[0, k]), float(w[k])))}</small></td></tr>")
    page.add("</table>")
    return png, page.write(f"explain_{name}.html"), run.classes[pred]


def gallery(run, h, args, out, data):
    x, labels, idx, source = data
    a, _, _ = run.activations(h, x)
    used = run.t["concept.weight"][h].abs().sum(1)
    concepts = [int(k) for k in torch.argsort(used, descending=True)[:args.concepts]]
    m = args.per_concept
    plt = pyplot()
    fig, axes = plt.subplots(len(concepts), m + 1, figsize=(1.5 * (m + 1), 1.7 * len(concepts)), dpi=100,
                             squeeze=False)
    n_bg = sum(run.is_background(h, k) for k in concepts)
    page = Page(out, f"Concept gallery: {run.meta['concept_type']} concepts, {run.meta['backbone']} @ "
                     f"{run.meta['layer']}, head s={run.grid[h][0]:g}")
    page.add(f"<p>The {len(concepts)} concepts the head weighs most, each with the {m} val images that activate it "
             f"most (activation under each). {n_bg} of them are <b style='color:#b00'>{BACKGROUND}</b> (padding, one "
             f"constant region or mostly near-black; IP_Prototype_training --exclude_background leaves such elements "
             f"out).</p>")
    page.add("<table><tr><th>concept</th><th>val images that activate it most</th></tr>")
    for r, k in enumerate(concepts):
        path = run.element_path(h, k)
        ax = axes[r][0]
        if path:
            ax.imshow(Image.open(path), interpolation="nearest")
        else:
            ax.text(0.5, 0.5, run.concept_name(h, k).replace(" ", "\n"), ha="center", va="center", fontsize=8)
        ax.set_title(run.concept_name(h, k)[:30] + ("\n[background]" if run.is_background(h, k) else ""),
                     fontsize=6)
        cells = []
        for j, i in enumerate(torch.argsort(a[:, k], descending=True)[:m].tolist()):
            img = source.image(int(idx[i]))
            axes[r][j + 1].imshow(img, interpolation="nearest")
            axes[r][j + 1].set_title(f"{run.classes[int(labels[i])][:12]} {float(a[i, k]):.2f}", fontsize=6)
            cells.append(page.image(img, f"gallery_c{k}_{j}.png", 96,
                                    mark=f"{run.classes[int(labels[i])]} {float(a[i, k]):.2f}"))
        for ax in axes[r]:
            ax.axis("off")
        page.add(f"<tr><td>{concept_cell(run, page, h, k, 'gallery', responds_to(a[:, k], labels, run.classes))}"
                 f"</td><td style='display:flex;gap:6px'>{''.join(f'<div>{c}</div>' for c in cells)}</td></tr>")
    page.add("</table>")
    fig.tight_layout()
    return save_png(fig, os.path.join(out, "gallery.png")), page.write("gallery.html")


def main(args):
    run = Run(args.run)
    h = run.head(args.ratio, args.lr)
    out = args.out or os.path.join(args.run, "explanations")
    if args.image:
        if not os.path.isfile(args.image):
            raise UserError(f"image {args.image} does not exist")
    else:   # the val entry is checked before anything is written
        data = val_data(run, args.verify)
        if not args.gallery and not 0 <= args.index < len(data[0]):
            raise UserError(f"--index must be in [0, {len(data[0])})")
    os.makedirs(out, exist_ok=True)
    if run.elements_missing:
        print(f"note: concepts are shown without their element images: {run.elements_missing}", file=sys.stderr)
    if args.gallery:
        png, page = gallery(run, h, args, out, data)
        print(f"gallery: {png} and {page}")
        return
    if args.image:
        x, img, label = embed_image(run, args.image), load_image(args.image), None
        name = os.path.splitext(os.path.basename(args.image))[0]
        try:   # what each concept responds to needs the val set; an image is explained without it
            data = val_data(run, args.verify)
        except UserError as e:
            print(f"note: no 'responds to' for the concepts: {e}", file=sys.stderr)
            data = None
    else:
        feats, labels, idx, source = data
        x, label = feats[args.index], int(labels[args.index])
        img, name = source.image(int(idx[args.index])), f"val{args.index}"
    png, page, pred = explain_one(run, h, x, img, label, name, args, out,
                                  val=None if data is None else (data[0], data[1]))
    print(f"predicted {pred}" + (f" (true {run.classes[label]})" if label is not None else "") + f": {png} and {page}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
