"""Looking inside a trained run: a head's concept activations for any features, each concept's contribution to a
prediction, and what each concept is (its element image, or its words)."""
import os

import numpy as np
import torch
import torch.nn.functional as F

from PIL import Image

from . import iis, results, store
from .elements import is_background
from .errors import UserError
from .fileio import file_digest
from .validate import check_element_index
from .heads import MaskedLinearHeads, SparseConceptHeads


HEADS_NEED = ("grid", "concept.weight")


def _load_heads(path):
    """heads.pt as the dict of tensors a trainer saved; anything else is one UserError naming the file."""
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {results.RETRAIN}") from None
    except Exception as e:    # pickle, zip and torch errors come in many types; all mean "not a heads file"
        raise UserError(f"{path} is not a heads file torch can load safely ({type(e).__name__}); "
                        f"{results.RETRAIN}") from None
    if not isinstance(t, dict) or not all(isinstance(t.get(k), torch.Tensor) for k in HEADS_NEED):
        raise UserError(f"{path} holds {type(t).__name__}, not the trainer's dict of tensors with "
                        f"{', '.join(HEADS_NEED)}; {results.RETRAIN}")
    return t


class Run:
    """A finished training run (results.json + heads.pt) with what is needed to explain its predictions."""

    def __init__(self, run_dir):
        self.dir, self.results = run_dir, results.read(run_dir)
        self.meta = self.results["meta"]
        self.t = _load_heads(os.path.join(run_dir, "heads.pt"))
        self.classes = self.meta["classes"]
        self.text = self.meta["concept_type"] == "text"
        self.grid = [tuple(g) for g in self.t["grid"].tolist()]
        self.n_concepts = self.t["concept.weight"].shape[1]
        self.elements, self.elements_missing = None, None
        if not self.text:
            self.elements, self.elements_missing = self._element_library()

    def _element_library(self):
        """The element rows behind the run's concepts, or (None, why not). A concept names element rows of the
        library it was trained from; a library or element embeddings rebuilt since (other settings, another dataset)
        hold other images under the same rows, so they are shown only when both are still the ones the run used."""
        index, entry = self.meta.get("elements"), self.meta.get("inputs", {}).get("concepts")
        if not index:            # concepts that never came from an element library: nothing to show
            return None, None
        if not os.path.isfile(index):
            return None, f"the element library {index} is gone"
        if not entry or not os.path.isfile(os.path.join(entry, "meta.json")):
            return None, f"the run's element embeddings {entry} are gone"
        emb = store.read_meta(entry)
        if emb.get("key_hash") != self.results["key"].get("concepts") or \
                emb["key"].get("data", {}).get("elements") != file_digest(index):
            return None, (f"the element library {os.path.dirname(index)} (or its embeddings) was rebuilt since this "
                          f"run, so its rows are other images; rebuild it with the run's settings to see them")
        return check_element_index(index)["elements"], None

    def head(self, ratio, lr=None, seed=None):
        """Index of the head at ``ratio`` (its best lr by the run's selection accuracy unless ``lr`` is given) of
        ``seed`` (default: the run's first seed)."""
        seed = self.results.get("seeds", [0])[0] if seed is None else seed
        rows = [r for r in iis.runs_of(self.results) if r["head"] == "concept" and abs(r["ratio"] - ratio) < 1e-9
                and (lr is None or abs(r["lr"] - lr) < 1e-12) and r["seed"] == seed]
        if not rows:
            raise UserError(f"no trained head at sparsity {ratio}" + (f", lr {lr}" if lr else "") +
                            f", seed {seed} in {self.dir}; ratios: {sorted({g[0] for g in self.grid})}")
        best = iis.pick(rows, f"sparsity {ratio:g}", seed)     # the head that scored: the same rule as the IIS
        if "index" in best:
            return best["index"]
        return next(i for i, (r, lr) in enumerate(self.grid)
                    if np.isclose(r, best["ratio"]) and np.isclose(lr, best["lr"], rtol=1e-6))

    def _group(self, h):
        return int(self.t["head_group"][h]) if "head_group" in self.t else 0

    def head_module(self, h):
        """Head ``h`` rebuilt from heads.pt as the module that was trained (a sweep of one head)."""
        ratios, n_classes = [self.grid[h][0]], len(self.classes)
        rule = self.results["key"].get("keep_rule", "round")     # recorded by the trainer (utils/sweep.py)
        if self.text:
            module = MaskedLinearHeads(self.n_concepts, n_classes, ratios, keep_rule=rule)
        else:
            c = self.t["concepts"]   # end2end: (H, K, D), each head's learnt concepts; (G, K, D): one set per seed
            c = c if c.ndim == 2 else c[h] if "assignment" in self.t else c[self._group(h)]
            module = SparseConceptHeads(c, n_classes, ratios, keep_rule=rule)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(self.t[f"concept.{name}"][h:h + 1])
        return module.eval()

    @torch.no_grad()
    def activations(self, h, x):
        """(activations before masking, after masking, logits) of head ``h`` for features ``x`` (N, D)."""
        x = torch.tensor(np.asarray(x), dtype=torch.float32)
        if self.text:   # the projection and standardisation IP_Text_training fitted
            x = (x @ self.t["projection"].T - self.t["standardise_mean"]) / self.t["standardise_std"]
        module = self.head_module(h)
        return module.activations(x)[0], module.masked_activations(x)[0], module(x)[0]

    def concept_name(self, h, k):
        """Words for text concepts; for visual ones where the element behind the concept was cut from (its image's
        class, method and scale). What a concept responds to is :func:`responds_to`."""
        if self.text:
            return self.meta["concepts"][k]
        row = self.element_row(h, k)
        if row is None or self.elements is None:
            return f"concept {k}"
        e = self.elements[row]
        return f"#{k}: cut from {e['class']} ({e['method']} s{e['scale']})"

    def element_row(self, h, k):
        """The element index row that shows concept k: the prototype itself, the element nearest a cluster centre,
        or, for end2end, the assigned element closest to the learnt concept."""
        if self.text:
            return None
        rows = self.t["concept_rows"]
        rows = rows[self._group(h)] if rows.ndim == 2 else rows
        if "assignment" not in self.t:
            return int(rows[k])
        members = torch.nonzero(self.t["assignment"][h] == k).flatten()
        if len(members) == 0:
            return None
        if self.elements is not None:      # the run's own element embeddings (checked in _element_library)
            emb = np.asarray(store.read(self.meta["inputs"]["concepts"])[0]["features"])[rows[members].numpy()]
            sims = F.normalize(torch.as_tensor(emb, dtype=torch.float32), dim=1) @ self.t["concepts"][h][k]
            return int(rows[members[int(sims.argmax())]])
        return int(rows[members[0]])

    def element_path(self, h, k):
        row = self.element_row(h, k)
        if row is None or self.elements is None:
            return None
        return os.path.join(os.path.dirname(self.meta["elements"]), self.elements[row]["file"])

    def element_paths(self, h, k, limit=12):
        """Every element image behind concept k, the shown one first: one for Prototype and Cluster concepts, all the
        pool elements assigned to it (up to ``limit``) for an End-to-end one."""
        first = self.element_path(h, k)
        if first is None or "assignment" not in self.t:
            return [first] if first else []
        rows = self.t["concept_rows"]
        rows = rows[self._group(h)] if rows.ndim == 2 else rows
        members = [int(rows[m]) for m in torch.nonzero(self.t["assignment"][h] == k).flatten()]
        root = os.path.dirname(self.meta["elements"])
        rest = [os.path.join(root, self.elements[r]["file"]) for r in members]
        return [first] + [p for p in rest if p != first][:limit - 1]

    def is_background(self, h, k):
        """True when the element image shown for concept k is mostly background (utils/elements.is_background)."""
        path = self.element_path(h, k)
        return bool(path) and is_background(Image.open(path).convert("RGB"))


def responds_to(acts, labels, classes, top=10):
    """What a concept responds to: the classes of the ``top`` val images that activate it most, commonest first,
    e.g. 'Trouser 8/10, Dress 2/10'."""
    order = torch.argsort(torch.as_tensor(acts), descending=True)[:top].numpy()
    counts = np.bincount(np.asarray(labels)[order], minlength=len(classes))
    return ", ".join(f"{classes[c]} {counts[c]}/{len(order)}" for c in np.argsort(-counts, kind="stable")
                     if counts[c])


def evidence(activation, weight):
    """How a contribution arises, in words: the sign of the activation (does the image look like the concept) and of
    the class weight (does the class want it)."""
    if activation == 0 or weight == 0:
        return "masked out or unused: no contribution"
    look = "looks like the concept" if activation > 0 else "does NOT look like the concept"
    want = "which the class counts for it" if weight > 0 else "whose presence the class counts against it"
    kind = ("presence evidence" if activation > 0 else "absence evidence") + \
        (" for" if activation * weight > 0 else " against") + " the class"
    return f"{kind}: the image {look}, {want}"


def contributions(run, h, x):
    """For one sample's features ``x`` (D,): (predicted class, logits, per-concept contribution to that class's logit
    = masked activation x weight, sorted concept indices by contribution, descending)."""
    _, masked, logits = run.activations(h, x[None])
    pred = int(logits[0].argmax())
    contrib = masked[0] * run.t["concept.weight"][h][:, pred]
    return pred, logits[0], contrib, torch.argsort(contrib, descending=True)
