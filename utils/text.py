"""Text concepts, Label-free-CBM style: CLIP scores each concept on each image; a bias-free projection learns to
reproduce those scores from the backbone's features; concepts CLIP cannot see or the backbone cannot express are
dropped; the rest are standardised and feed the same sparse heads as the visual path.
"""
import json
import logging
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .errors import UserError
from .fileio import file_digest

# ---------------------------------------------------------------------------------------------------------------------
# Concept lists
# ---------------------------------------------------------------------------------------------------------------------


def normalise_concept(c):
    """Lower-case, single-spaced, stripped."""
    return " ".join(str(c).lower().split())


def read_concepts(path):
    """A deduplicated concept list from a text file (one per line, '#' comments) or a JSON file (a list, or a dict of
    class -> list of concepts, the LaBo format). Order of first appearance is kept; empty entries are dropped."""
    if not os.path.isfile(path):
        raise UserError(f"concept file {path} does not exist")
    if path.endswith(".json"):
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} is not valid JSON ({e})") from None
        if isinstance(data, dict):
            raw = [c for v in data.values() for c in (v if isinstance(v, list) else [v])]
        elif isinstance(data, list):
            raw = data
        else:
            raise UserError(f"{path}: expected a list of concepts or an object of class -> concepts")
    else:
        with open(path, encoding="utf-8") as f:
            raw = [ln.split("#", 1)[0] for ln in f]
    seen, out = set(), []
    for c in raw:
        n = normalise_concept(c)
        if n and n not in seen:
            seen.add(n)
            out.append(n)
    if not out:
        raise UserError(f"{path} holds no concepts")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# CLIP through open_clip
# ---------------------------------------------------------------------------------------------------------------------
class CLIP:
    """An open_clip model by name + pretrained tag (e.g. ViT-B-16 / openai), a local checkpoint file, or random
    weights (``pretrained='none'``, for tests). ``model_name`` may also be a path to an open_clip model-config JSON.
    """

    def __init__(self, model_name="ViT-B-16", pretrained="openai", device="cpu"):
        import open_clip
        name = model_name
        if model_name.endswith(".json"):
            if not os.path.isfile(model_name):
                raise UserError(f"CLIP model config {model_name} does not exist")
            open_clip.add_model_config(model_name)
            name = os.path.splitext(os.path.basename(model_name))[0]
        if name not in open_clip.list_models():
            raise UserError(f"unknown CLIP model {model_name!r}; see open_clip.list_models()")
        local = pretrained not in ("none", "") and os.path.exists(pretrained)
        if pretrained not in ("none", "") and not local:
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pretrained not in tags:
                raise UserError(f"unknown pretrained tag {pretrained!r} for {name}; known: {', '.join(tags)}, "
                                f"'none', or a local checkpoint file")
        random_init = pretrained in ("none", "")
        # open_clip logs a warning for random weights; here they are asked for (--clip_pretrained none), not an accident
        before = logging.root.manager.disable
        if random_init:
            logging.disable(logging.WARNING)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if random_init else pretrained, device=device)
        except (RuntimeError, OSError, ValueError) as e:
            raise UserError(f"could not load CLIP {name} / {pretrained} ({type(e).__name__}: {str(e)[:150]}); "
                            f"connect once to download it, or pass a local checkpoint with --clip_pretrained") from None
        finally:
            logging.disable(before)
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, open_clip.get_tokenizer(name)
        self.device = torch.device(device)
        cfg = open_clip.get_model_config(name)
        self.key = {"clip_model": name, "clip_config": cfg,
                    "clip_pretrained": f"file:{file_digest(pretrained)}" if local else pretrained}

    @torch.no_grad()
    def encode_text(self, concepts, batch_size=256):
        """Unit-norm text features (C, d) of ``concepts``."""
        out = []
        for i in range(0, len(concepts), batch_size):
            tokens = self.tokenizer(list(concepts[i:i + batch_size])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out).numpy()

    def image_encoder(self):
        """A module mapping preprocessed images to unit-norm CLIP image features (for utils.extraction.extract)."""
        return _ImageEncoder(self.model)


class _ImageEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return F.normalize(self.model.encode_image(x).float(), dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# The Label-free-CBM steps
# ---------------------------------------------------------------------------------------------------------------------
def clip_activations(image_features, text_features):
    """CLIP's score of each concept on each image: cosine similarity (both inputs unit-norm), (N, C)."""
    return np.asarray(image_features, np.float32) @ np.asarray(text_features, np.float32).T


def top5_mean(activations):
    """Per concept, the mean of its 5 highest activations over the images: does CLIP see it anywhere?"""
    a = torch.as_tensor(np.asarray(activations))
    return a.topk(min(5, a.shape[0]), dim=0).values.mean(0).numpy()


def cos3_similarity(target, pred):
    """Per concept (column), the cosine similarity of the centred, cubed activations over the samples.

    Cubing emphasises each concept's highly activating samples, which are the ones that make a concept meaningful.
    Returns a (C,) tensor in [-1, 1]; the projection maximises its mean.
    """
    t = (target - target.mean(0, keepdim=True)) ** 3
    p = (pred - pred.mean(0, keepdim=True)) ** 3
    return F.cosine_similarity(t, p, dim=0, eps=1e-12)


def fit_projection(x_train, a_train, x_val, a_val, lr=1e-3, batch_size=2048, max_epochs=200, patience=10, seed=0,
                   desc="projection"):
    """Learn W (C, D) so that x @ W.T matches the CLIP activations under the cos^3 similarity.

    Mini-batch Adam on the negative mean similarity (a loss to *minimise*: maximising the similarity); early stopping
    on the val similarity with ``patience`` epochs. Returns (W, per-concept val similarity at the kept epoch).
    """
    device = x_train.device
    g = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(a_train.shape[1], x_train.shape[1], generator=g).to(device) / x_train.shape[1] ** 0.5)
    opt = torch.optim.Adam([w], lr=lr)
    best, best_w, best_sim, stale = -np.inf, w.detach().clone(), None, 0
    bar = tqdm(range(max_epochs), desc=desc, unit="epoch", dynamic_ncols=True)
    for _ in bar:
        perm = torch.randperm(len(x_train), generator=g).to(device)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:
                continue
            loss = -cos3_similarity(a_train[idx], x_train[idx] @ w.T).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            sim = cos3_similarity(a_val, x_val @ w.T)
        score = sim.mean().item()
        bar.set_postfix(val_sim=f"{score:.3f}", refresh=False)
        if score > best + 1e-5:
            best, best_w, best_sim, stale = score, w.detach().clone(), sim.cpu(), 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best_w, best_sim.numpy()


class Standardiser:
    """(a - mean) / std with statistics of the training activations (saved with the heads)."""

    def __init__(self, a_train):
        self.mean = a_train.mean(0, keepdim=True)
        self.std = a_train.std(0, keepdim=True).clamp_min(1e-6)

    def __call__(self, a):
        return (a - self.mean) / self.std
