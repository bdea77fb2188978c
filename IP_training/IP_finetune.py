r"""Fine-tune a backbone with interpretability maximisation (or plainly, with --lambda_interp 0: the baseline arm).

    python -m IP_training.IP_finetune --model_config efficientnet_lite0 --dataset fashion_mnist \
        --train_size 1000 --val_size 1000 --elements concept_library/prototype/segments \
        --lambda_interp 1 --ratio 0.1 --n_concepts 200 --train_layers 2 --epochs 4 --seed 0 \
        --out outputs/finetune/fashion_mnist/efficientnet_lite0/interp1_seed0

Objective: CE of a linear classifier on the pooled feature + lambda x CE of a sparse concept head on the same feature
(the sweep's head: LayerNorm(feature . unit concepts), each sample keeps its top round((1 - ratio) K) activations by
absolute value, linear). Concepts are the element library's embeddings through the current backbone (--refresh:
recomputed at every step with gradient into the backbone, the default; every epoch; or frozen at the pretrained
backbone — docs/finetune.md: what each measured). Both terms train the chosen layers; lambda = 0 is plain fine-tuning (the concept head then only watches). Light augmentation (random
resized crop of 50-100 % of the area, aspect 3/4-4/3, horizontal flip), identical in both arms; the backbone runs in
eval mode (BatchNorm statistics stay as pretrained). With --train_layers N or module names, the input of the first
trained module is computed once per image view and cached (--cache_views views per train image, default one per
epoch, so caching changes nothing but the time).

Output in --out: backbone.safetensors (the whole model's weights: score it with any stage's --weights PATH, e.g.
scripts/run_pipeline.sh --weights OUT/backbone.safetensors), finetune.json (settings, trained modules, per-epoch train
loss of both terms and val top-1 of both heads, reload check). After each epoch, state.pt (model, optimiser, heads,
RNG) is written atomically: a killed run started again with the same flags resumes after its last finished epoch.
With --save_epochs 1 2 3, the checkpoint after each listed epoch is also kept (backbone_epoch<E>.safetensors).
"""
import argparse

from utils import cli
from utils.cli import flags
from utils.finetune.trainer import CONCEPT_TYPES, REFRESH, FinetuneConfig, run


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_backbone_args(p)
    g = flags.add_dataset_args(p)
    g.add_argument("--train_size", type=int, default=0,
                   help="seeded subset of the train split to fine-tune on (0 = all; the same rows as "
                        "dataset_feature_extractor --max_images)")
    g.add_argument("--val_size", type=int, default=0, help="seeded subset of the val split for the per-epoch top-1")
    g = p.add_argument_group("concepts")
    g.add_argument("--elements", default="concept_library/prototype/segments",
                   help="element library folder (holds index.json) from segment_extractor or patch_extractor")
    g.add_argument("--concept_type", default="prototype", choices=CONCEPT_TYPES,
                   help="prototype: element embeddings chosen evenly across classes; cluster: means of KMeans "
                        "clusters of all element embeddings (membership fixed by the pretrained backbone)")
    g.add_argument("--n_concepts", type=int, default=200, help="concepts K")
    g.add_argument("--concept_seed", type=int, default=0,
                   help="seed of the prototype choice / KMeans (0 = the concepts the scoring sweep uses by default)")
    g.add_argument("--refresh", default="step", choices=REFRESH,
                   help="how often concept vectors are recomputed through the current backbone: every step, with "
                        "gradient into the backbone (default; costs a forward/backward of the K concept elements per "
                        "step), every epoch (no gradient through them), or frozen at the pretrained backbone's")
    g = p.add_argument_group("objective")
    g.add_argument("--lambda_interp", type=float, default=1.0,
                   help="weight of the sparse concept head's CE (0 = plain fine-tuning, the baseline arm)")
    g.add_argument("--ratio", type=float, default=0.1, help="sparsity ratio of the concept head, in [0, 1)")
    g = p.add_argument_group("training")
    g.add_argument("--train_layers", nargs="+", default=["all"],
                   help="all; N = the last N blocks plus what runs after them up to the feature layer; or module "
                        "names from model.named_modules() (e.g. blocks.6 conv_head bn2)")
    g.add_argument("--epochs", type=int, default=4, help="epochs (cosine learning-rate decay over them)")
    g.add_argument("--save_epochs", nargs="*", type=int, default=[],
                   help="also write the checkpoint after each of these epochs (1-based) as "
                        "OUT/backbone_epoch<E>.safetensors, loadable through --weights like the final one")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the trained backbone layers")
    g.add_argument("--head_lr", type=float, default=1e-3, help="AdamW learning rate of the two heads")
    g.add_argument("--weight_decay", type=float, default=0.01,
                   help="decoupled weight decay of the trained backbone weights (not of biases or norm parameters)")
    g.add_argument("--batch_size", type=int, default=64, help="training batch size")
    g.add_argument("--seed", type=int, default=0, help="seed of the heads' initialisation and the batch order")
    g.add_argument("--aug_seed", type=int, default=0,
                   help="seed of the augmentation draws (kept apart from --seed so that arms and seeds can share "
                        "one activation cache)")
    g.add_argument("--cache", default="auto", choices=["auto", "on", "off"],
                   help="cache the input of the first trained module (auto: when only part of the network trains "
                        "and the cached path reproduces the full forward)")
    g.add_argument("--cache_views", type=int, default=0,
                   help="augmented views cached per train image; epoch e uses view e mod V (0 = one per epoch)")
    g.add_argument("--cache_dir", default=None,
                   help="where cached activations go (default OUT/cache); runs with the same backbone, data, views "
                        "and first trained module share them")
    flags.add_device_arg(g)
    flags.add_amp_arg(g)
    flags.add_workers_arg(g)
    p.add_argument("--out", required=True, help="output folder: backbone.safetensors, finetune.json")
    return p


def main(args):
    run(cli.config(FinetuneConfig, args))


if __name__ == "__main__":
    cli.run(main, get_args_parser())
