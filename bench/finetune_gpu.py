"""scripts/finetune_compare.sh in one Python process, for a GPU with minutes to spare: the same stages with the same
flags (element library, element embeddings, train/val features, the scoring sweep, iis_computing --report, the
table), called through each stage's own ``get_args_parser()`` and ``main(args)``. On a GPU, starting ~70 Python
processes (5-6 stages per scored backbone) would cost more than the work; here torch, timm and CUDA start once.

    python3 -m bench.finetune_gpu --train_size 4000 --val_size 2000 --train_layers all --epochs 3 \\
        --out /tmp/ftgpu --report /tmp/ftgpu/report

Every stage keeps its own caching, so a second call reuses what the first finished.
"""
import argparse
import os
import time

from utils import cli
from utils.fileio import atomic_write_bytes
from utils.finetune.compare import write_comparison
from utils.finetune.trainer import CHECKPOINT, CONCEPT_TYPES, REFRESH
from utils.specs import model_tag


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_config", default="efficientnet_lite0")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data_root", default="data")
    p.add_argument("--train_size", type=int, default=4000)
    p.add_argument("--val_size", type=int, default=2000)
    p.add_argument("--images_per_class", type=int, default=4)
    p.add_argument("--library", default="concept_library/prototype")
    p.add_argument("--concept_type", default="prototype", choices=CONCEPT_TYPES)
    p.add_argument("--n_concepts", type=int, default=200)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--train_layers", nargs="+", default=["all"])
    p.add_argument("--refresh", default="step", choices=REFRESH)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--head_lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--score_epochs", type=int, default=30)
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="outputs")
    p.add_argument("--report", default=None)
    return p


def stage(module, argv):
    import importlib
    mod = importlib.import_module(module)
    mod.main(mod.get_args_parser().parse_args([str(a) for a in argv]))


def main(args):
    t0 = time.time()
    tag_data = os.path.basename(args.dataset.rstrip("/"))
    tag_model = model_tag(args.model_config)
    base = os.path.join(args.out, "finetune", tag_data, tag_model)
    report = args.report or os.path.join(args.out, "reports", f"finetune_{tag_data}_{tag_model}")
    data = ["--dataset", args.dataset, "--data_root", args.data_root]
    loader = ["--device", args.device, "--workers", args.workers, "--batch_size", 256]
    lib = os.path.join(args.library, "segments")
    stage("concept_extractor.segment_extractor", data + ["--images_per_class", args.images_per_class,
                                                         "--out_dir", args.library,
                                                         "--workers", min(8, args.workers)])
    runs, manifest, times = [], [], {}

    def score(tag, weights):
        t = time.time()
        bb = ["--model_config", args.model_config] + (["--weights", weights] if weights else [])
        feat = os.path.join(base, "score", tag, "features", tag_data, tag_model)
        stage("concept_extractor.visual_element_emb_extractor", bb + loader + ["--elements", lib, "--out",
                                                                              os.path.join(feat, "elements_segments")])
        for split, n in (("train", args.train_size), ("val", args.val_size)):
            stage("concept_extractor.dataset_feature_extractor", bb + data + loader + [
                "--split", split, "--max_images", n, "--out", os.path.join(feat, split)])
        run = os.path.join(base, "score", tag, "runs", tag_data, tag_model, f"{args.concept_type}_segments")
        stage("IP_training.IP_Prototype_training", [
            "--train_features", os.path.join(feat, "train"), "--val_features", os.path.join(feat, "val"),
            "--concepts", os.path.join(feat, "elements_segments"), "--concept_type", args.concept_type,
            "--n_concepts", args.n_concepts, "--epochs", args.score_epochs, "--lrs", 0.001, 0.01,
            "--device", args.device, "--out", run])
        runs.append(run)
        times[f"score {tag}"] = round(time.time() - t, 1)
        return run

    manifest.append(("pretrained", "", "-", score("pretrained", None)))
    for seed in args.seeds:
        for lam in [0.0] + list(args.lambdas):
            arm, tag = ("plain", f"plain_seed{seed}") if lam == 0 else ("interp", f"interp{lam:g}_seed{seed}")
            t = time.time()
            out = os.path.join(base, "ft", tag)
            stage("IP_training.IP_finetune", [
                "--model_config", args.model_config, *data, "--train_size", args.train_size, "--val_size",
                args.val_size, "--elements", lib, "--concept_type", args.concept_type, "--n_concepts",
                args.n_concepts, "--ratio", args.ratio, "--lambda_interp", lam, "--train_layers",
                *args.train_layers, "--refresh", args.refresh, "--epochs", args.epochs, "--lr", args.lr,
                "--head_lr", args.head_lr, "--batch_size", args.batch_size, "--seed", seed, "--cache_dir",
                os.path.join(base, "cache"), "--workers", args.workers, "--device", args.device, "--out", out])
            times[f"finetune {tag}"] = round(time.time() - t, 1)
            manifest.append((arm, f"{lam:g}", str(seed), score(tag, os.path.join(out, CHECKPOINT))))
    os.makedirs(report, exist_ok=True)
    path = os.path.join(base, "manifest.tsv")
    atomic_write_bytes(path, "".join("\t".join(r) + "\n" for r in manifest).encode())
    stage("iis_computing", runs + ["--report", report, "--plot", os.path.join(report, "curves.png")])
    write_comparison(path, report)
    print("seconds per step: " + ", ".join(f"{k} {v}" for k, v in times.items()))
    print(f"total {time.time() - t0:.0f} s; table: {report}/finetune_compare.md")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
