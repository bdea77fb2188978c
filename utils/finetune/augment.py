"""Images for fine-tuning: a deterministic light augmentation (random resized crop + horizontal flip, the same view in
every process, worker and resumed run), the evaluation view, and the loaders that batch them."""
import math

import numpy as np
from torch.utils.data import DataLoader

from ..data import TransformedImages

AUG_SCALE = (0.5, 1.0)          # random resized crop: fraction of the image's area, and aspect ratio range
AUG_RATIO = (3 / 4, 4 / 3)


def crop_params(width, height, rng, scale=AUG_SCALE, ratio=AUG_RATIO):
    """(top, left, height, width) of a random crop covering ``scale`` of the area with aspect ratio in ``ratio``
    (log-uniform); after 10 misses, the central square."""
    area = width * height
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= width and 0 < ch <= height:
            return int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1)), ch, cw
    s = min(width, height)
    return (height - s) // 2, (width - s) // 2, s, s


class AugmentedImages:
    """Map-style dataset of (tensor, label) over (view, row) pairs: view v of image ``indices[row]`` is a random
    resized crop (to the backbone's input size) and a coin-flip horizontal flip drawn from the generator seeded by
    (aug_seed, v, image index), so a view is the same in every process, worker and resumed run."""

    def __init__(self, source, indices, preprocess, views, aug_seed=0):
        from torchvision import transforms as T
        self.source, self.indices, self.views, self.aug_seed = source, np.asarray(indices), list(views), aug_seed
        self.pre = preprocess
        self.tail = T.Compose([T.ToTensor(), T.Normalize(preprocess.mean, preprocess.std)])

    def __len__(self):
        return len(self.views) * len(self.indices)

    def __getitem__(self, i):
        from torchvision.transforms import functional as TF
        v, row = self.views[i // len(self.indices)], i % len(self.indices)
        j = int(self.indices[row])
        img = self.source.image(j)
        rng = np.random.default_rng([self.aug_seed, v, j])
        top, left, h, w = crop_params(img.width, img.height, rng)
        img = TF.resized_crop(img, top, left, h, w, [self.pre.crop, self.pre.crop], self.pre.interpolation_mode(),
                              antialias=True)
        if rng.random() < 0.5:
            img = TF.hflip(img)
        return self.tail(img), int(self.source.targets[j])


def eval_images(source, indices, preprocess):
    """The evaluation view (the weights' own transform) of ``source`` images at ``indices``."""
    return TransformedImages(source, indices, preprocess.image_transform())


def loader(dataset, batch_lists, workers, device, persistent=False):
    """A DataLoader over fixed ``batch_lists`` (lists of dataset indices), pinned for CUDA."""
    return DataLoader(dataset, batch_sampler=batch_lists, num_workers=workers, pin_memory=device.type == "cuda",
                      prefetch_factor=4 if workers else None, persistent_workers=persistent and workers > 0)


def batches(n, size, order=None):
    """Rows 0..n-1 (or ``order``) cut into lists of ``size``."""
    order = np.arange(n) if order is None else order
    return [order[i:i + size].tolist() for i in range(0, n, size)]
