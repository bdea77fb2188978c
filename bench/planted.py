"""Planted representations for the validity suite (bench/validity.py): features whose interpretable share is known.

Every sample has a sparse code ``a`` over K concepts: class y owns ``per_class`` of them (its signature; consecutive
classes share some, so classes overlap), and a sample's code is ``strength`` x (1 + ``jitter`` N(0, 1)) on its class's
concepts and 0 elsewhere. A representation writes the code along K orthonormal directions F and adds noise:

    x = a @ F_share + noise * g,        F_share = the orthonormal frame nearest to sqrt(1 - share) C + sqrt(share) B

* ``C`` (K, D): the **concept directions**, orthonormal, K < D: what the element library shows.
* ``B`` (K, D): K **non-concept directions**, a random orthonormal frame drawn independently of C. A code written
  along B carries the same class information, but densely with respect to the concepts: projected on them, every
  sample's class information is a little of every concept, so a few concepts cannot keep it.
* ``F_share`` is the polar factor of the mix ((M M^T)^(-1/2) M), so every share writes the code through an exact
  isometry: the class means, the within-class spread and the noise are the same up to a rotation for every share,
  hence so is the Bayes accuracy and the accuracy of a converged linear probe. Only the alignment with the concepts
  changes: share 0 writes the code along the concepts themselves, share 1 along B.
* ``g`` is isotropic Gaussian noise (``noise`` per coordinate). Labels, codes and noise are drawn once per seed and
  shared by every share: all representations describe the same samples and are compared pair-wise on them.

``share`` is the planted non-concept share of the class information: 0 = all of it on the concept directions (a
sample's few strongest concepts carry its class), 1 = none of it beyond what a random frame shares with them by chance.

**Element embeddings** (what an element library would give): for every class and every concept of its signature,
``elements_per_concept`` noisy copies of that concept's direction (noise ``element_noise`` per unit norm), labelled
by that class. They do not depend on the share: the concepts look the same whatever the representation does with the
class information.

**The random control.** The share-0 representation seen in a random orthonormal basis: its features multiplied by a
random rotation Q (drawn independently of B), the element embeddings left as they are. Equivalently, the same
features with randomly rotated concepts (every inner product x . c becomes x . Q^T c). It is exactly as classifiable as
every share (an isometry again), and its class information bears no relation to the concepts: the same, in
distribution, as share 1 (a code along a random frame), reached another way. A score that measures how much class
information the concepts carry must put it at the bottom, level with share 1. (A rotation applied to the element
embeddings as well changes no inner product and hence no IIS: a property, not a control.)
"""
import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

GENERATOR_VERSION = 1


@dataclass(frozen=True)
class Planted:
    dim: int = 64
    n_concepts: int = 16
    n_classes: int = 10
    per_class: int = 3
    elements_per_concept: int = 4
    n_train: int = 3000
    n_val: int = 1500
    strength: float = 1.0
    jitter: float = 0.25
    noise: float = 0.5
    element_noise: float = 0.3
    seed: int = 0

    def key(self):
        return dict(asdict(self), generator=GENERATOR_VERSION)


def _signatures(p, rng):
    """(C, per_class) concept indices of each class: every concept used at least once, neighbours overlapping."""
    if p.n_concepts > p.n_classes * p.per_class:
        raise ValueError(f"{p.n_concepts} concepts cannot all be used by {p.n_classes} classes x {p.per_class}")
    order = rng.permutation(p.n_concepts)
    sig = []
    for c in range(p.n_classes):
        # a sliding window over a random order: consecutive classes share concepts, every concept is covered
        start = (c * p.n_concepts) // p.n_classes
        sig.append(order[(start + np.arange(p.per_class)) % p.n_concepts])
    return np.array(sig)


def _frame(rng, k, d):
    """(k, d) random orthonormal rows."""
    q, r = np.linalg.qr(rng.normal(size=(d, k)))
    return (q * np.sign(np.diag(r))).T.copy()


def frame(lat, share):
    """(K, D) orthonormal frame the code is written along at non-concept ``share`` (the polar factor of the mix)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    m = np.sqrt(1 - share) * lat["concepts"] + np.sqrt(share) * lat["other"]
    w, v = np.linalg.eigh(m @ m.T)
    return (v / np.sqrt(w)) @ v.T @ m


def latent(p):
    """Everything that does not depend on the share: a dict of arrays (see the module docstring)."""
    rng = np.random.default_rng([p.seed, GENERATOR_VERSION])
    concepts, other = _frame(rng, p.n_concepts, p.dim), _frame(rng, p.n_concepts, p.dim)
    rotation = _frame(rng, p.dim, p.dim)
    sig = _signatures(p, rng)

    def split(n):
        y = rng.integers(0, p.n_classes, n)
        code = np.zeros((n, p.n_concepts))
        np.put_along_axis(code, sig[y], p.strength * (1 + p.jitter * rng.normal(size=(n, p.per_class))), axis=1)
        return dict(y=y, code=code, g=rng.normal(size=(n, p.dim)))

    train, val = split(p.n_train), split(p.n_val)
    el_rows = [(c, k) for c in range(p.n_classes) for k in sig[c] for _ in range(p.elements_per_concept)]
    el_concept = np.array([k for _, k in el_rows])
    el_noise = rng.normal(size=(len(el_rows), p.dim)) * p.element_noise / np.sqrt(p.dim)
    return dict(concepts=concepts, other=other, rotation=rotation, signatures=sig, train=train, val=val,
                element_labels=np.array([c for c, _ in el_rows]), element_concept=el_concept,
                elements=concepts[el_concept] + el_noise)


def features(p, lat, part, share, scale=1.0, rotate=False):
    """(N, D) float32 features of split ``part`` ('train' or 'val') at non-concept ``share``, times ``scale``; with
    ``rotate``, seen in the control's random basis."""
    s = lat[part]
    x = s["code"] @ frame(lat, share) + p.noise * s["g"]
    if rotate:
        x = x @ lat["rotation"].T
    return (scale * x).astype(np.float32)


def elements(lat, scale=1.0):
    """(E, D) float32 element embeddings and their (E,) class labels."""
    return (scale * lat["elements"]).astype(np.float32), lat["element_labels"].astype(np.int64)


def labels(lat, part):
    return lat[part]["y"].astype(np.int64)


def content_id(p):
    """Short id of everything that determines the latent draws (the store keys carry it)."""
    return hashlib.sha256(json.dumps(p.key(), sort_keys=True).encode()).hexdigest()[:12]
