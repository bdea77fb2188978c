"""The pieces of the fine-tuning objective (utils/finetune/trainer.py): the live concept head, the gradient scale that
makes lambda act on the backbone only, and the cosine learning-rate schedule."""
import math

import torch
import torch.nn.functional as F

from ..heads import SparseHeads


class LiveConceptHead(SparseHeads):
    """One sparse concept head (the sweep's head) whose concept vectors are set from outside before each use: the
    element embeddings through the current backbone. ``concept_matrix`` normalises them, as the sweep does."""

    def __init__(self, n_concepts, n_classes, ratio, seed=0):
        super().__init__(n_concepts, n_classes, [ratio], seed)
        self.current = None

    def set_concepts(self, c):
        self.current = c

    def concept_matrix(self):
        if self.current is None:
            raise RuntimeError("concept vectors not set")
        return F.normalize(self.current.float(), dim=-1)


class GradScale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale`` (no gradient at all when scale is 0)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (None if ctx.scale == 0 else g * ctx.scale), None


def grad_scale(x, scale):
    return GradScale.apply(x, float(scale))


def cosine(base, step, total):
    """The lr at ``step`` of ``total``: ``base`` decayed to 0 along half a cosine."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
