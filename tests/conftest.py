import os

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image_folder(root, n_train=6, n_val=3, size=40, seed=0):
    """A 3-class ImageFolder whose classes differ in a planted colour patch (red / green / blue square)."""
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    for split, n in (("train", n_train), ("val", n_val)):
        for name, col in colours.items():
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                img = rng.integers(90, 140, size=(size, size, 3), dtype=np.uint8)
                y, x = rng.integers(0, size // 2, size=2)
                img[y:y + size // 2, x:x + size // 2] = col
                Image.fromarray(img).save(os.path.join(d, f"{i:03d}.png"))
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(str(tmp_path / "shapes"))
