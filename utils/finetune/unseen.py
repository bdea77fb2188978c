"""The unseen concepts of a fine-tuning comparison (scripts/finetune_compare.sh): an element library cut from train
images that neither the training library (whose elements the interpretability term used) nor the fine-tuning's own
train subset contain, so the concepts scored on it are ones the fine-tuning never saw in any role.

The element extractors pick ``images_per_class`` images of each class of the train split with
:func:`utils.data.per_class_indices` (``--element_seed``); the fine-tuning trains on
:func:`utils.data.subset_indices` (``--train_size``, ``--subset_seed``). :func:`disjoint_seed` tries element seeds
from 1 until one picks none of those images; :func:`shared_sources` checks the two built libraries afterwards by the
source image each element records."""
import numpy as np

from ..data import get_source, per_class_indices, subset_indices
from ..errors import UserError
from ..library import read_index


def library_images(targets, images_per_class, seed):
    """The train-split rows the element extractors cut a library from at ``seed``."""
    return {int(i) for v in per_class_indices(np.asarray(targets), images_per_class, seed).values() for i in v}


def disjoint_seed(dataset, data_root, images_per_class, element_seed=0, train_size=0, subset_seed=0, tries=1000):
    """(seed, also_disjoint_from_the_subset): the first element seed after ``element_seed`` whose images are neither
    in the training library nor in the fine-tuning's train subset. With the whole train split fine-tuned on
    (``train_size`` 0) no library can avoid the subset: the seed then avoids the training library only."""
    src = get_source(dataset, "train", data_root)
    used = library_images(src.targets, images_per_class, element_seed)
    rows = subset_indices(len(src), train_size or None, subset_seed)
    partial = len(rows) < len(src)
    if partial:
        used |= {int(i) for i in rows}
    for seed in range(element_seed + 1, element_seed + 1 + tries):
        if not library_images(src.targets, images_per_class, seed) & used:
            return seed, partial
    raise UserError(f"no element seed in {element_seed + 1}..{element_seed + tries} picks {images_per_class} images "
                    f"per class outside the training library and the {len(rows)}-image fine-tuning subset of "
                    f"{dataset}; lower --images_per_class or --train_size")


def shared_sources(folder_a, folder_b):
    """Source images (as each element records them) that the element libraries ``folder_a`` and ``folder_b`` share."""
    (_, a), (_, b) = read_index(folder_a), read_index(folder_b)
    return sorted({r["source"] for r in a["elements"]} & {r["source"] for r in b["elements"]})
