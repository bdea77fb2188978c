"""Building text concept sets for any class list: from a class -> concepts JSON (LaBo's format) or from WordNet's
lexical relations, then filtered for duplicates, length and near-copies of class names.

WordNet is read straight from its database files (Princeton WordNet 3.0 as Debian's `wordnet-base` installs it in
/usr/share/wordnet), so no download and no NLTK are needed. For a class, the concepts are the names of its parts and
substances (part/substance meronyms) and of its hypernyms' parts, and its hypernyms themselves: what a thing is made
of and what it is a kind of, the relations that name visible attributes.
"""
import difflib
import json
import os
import re

from .errors import UserError
from .text import normalise_concept

WORDNET_DIRS = ("/usr/share/wordnet", "/usr/share/wordnet/dict", "/usr/local/share/wordnet")
PART_POINTERS = ("%p", "%s")   # part meronym, substance meronym
WNID = re.compile(r"^n(\d{8})$")


def find_wordnet(path=None):
    for d in ([path] if path else []) + list(WORDNET_DIRS):
        if d and os.path.isfile(os.path.join(d, "data.noun")) and os.path.isfile(os.path.join(d, "index.noun")):
            return d
    raise UserError("no WordNet database found (looked in " + ", ".join([path] if path else list(WORDNET_DIRS)) +
                    "); install Debian's wordnet-base or pass --wordnet DIR holding data.noun and index.noun")


class WordNet:
    """The noun part of a WordNet database: lemma -> synsets, synset -> (lemmas, pointers, gloss)."""

    def __init__(self, path=None):
        self.dir = find_wordnet(path)
        self.index = {}
        with open(os.path.join(self.dir, "index.noun"), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(" "):
                    continue                       # licence header lines start with spaces
                parts = line.split()
                n_ptr = int(parts[3])
                self.index[parts[0]] = parts[6 + n_ptr:]
        self._data = open(os.path.join(self.dir, "data.noun"), "rb")

    def synset(self, offset):
        """(lemmas, [(pointer, offset)], gloss) of the noun synset at byte ``offset``."""
        self._data.seek(int(offset))
        line = self._data.readline().decode("utf-8", errors="replace")
        head, _, gloss = line.partition(" | ")
        f = head.split()
        n_words = int(f[3], 16)
        lemmas = [f[4 + 2 * i].replace("_", " ") for i in range(n_words)]
        i = 4 + 2 * n_words
        n_ptr = int(f[i])
        ptrs = [(f[i + 1 + 4 * j], f[i + 2 + 4 * j]) for j in range(n_ptr) if f[i + 3 + 4 * j] == "n"]
        return lemmas, ptrs, gloss.strip()

    def lookup(self, name):
        """Synset offsets for a class name: an ImageNet wnid (n01440764), the name itself, or its last word."""
        m = WNID.match(name)
        if m:
            return [m.group(1)]
        key = name.strip().lower().replace(" ", "_").replace("-", "_")
        for cand in (key, key.split("_")[-1], key.rstrip("s")):
            if cand in self.index:
                return self.index[cand]
        return []

    def concepts(self, name, senses=1):
        """Part/substance names of the class and of its hypernyms, then the hypernyms' names."""
        parts, kinds = [], []
        for off in self.lookup(name)[:senses]:
            _, ptrs, _ = self.synset(off)
            hyper = [o for p, o in ptrs if p in ("@", "@i")]
            for src in [off] + hyper:
                for p, o in self.synset(src)[1]:
                    if p in PART_POINTERS:
                        parts.append(self.synset(o)[0][0])
            kinds += [self.synset(o)[0][0] for o in hyper]
        return parts + kinds


def read_class_concepts(path):
    """{class: [concepts]} from a LaBo-style JSON file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} as a JSON object of class -> concepts ({type(e).__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise UserError(f"{path}: expected a JSON object of class -> list of concepts")
    return {str(k): [str(c) for c in v] for k, v in data.items()}


def _stem(phrase):
    """Crude plural folding for duplicate detection ('stripes' ~ 'stripe')."""
    return " ".join(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in phrase.split())


def filter_concepts(by_class, max_words=4, max_chars=40, class_similarity=0.85):
    """Flatten {class: [concepts]} into one list, dropping (with the reason recorded):

    * ``empty`` / ``too long``: blank, or more than ``max_words`` words or ``max_chars`` characters;
    * ``class name``: the concept is, contains, or nearly is (difflib ratio >= ``class_similarity``) any class name,
      which would let a head read the label straight off the concept;
    * ``duplicate``: the same as an earlier concept up to case, spacing and plural 's'.

    Returns (kept, {concept: reason}).
    """
    names = [normalise_concept(c.replace("_", " ")) for c in by_class]
    kept, dropped, seen = [], {}, set()
    for concepts in by_class.values():
        for raw in concepts:
            c = normalise_concept(raw.replace("_", " "))
            if not c:
                dropped[raw] = "empty"
            elif len(c.split()) > max_words or len(c) > max_chars:
                dropped[c] = "too long"
            elif any(c == n or re.search(rf"\b{re.escape(n)}s?\b", c) or
                     difflib.SequenceMatcher(None, c, n).ratio() >= class_similarity for n in names):
                dropped[c] = "class name"
            elif _stem(c) in seen:
                dropped.setdefault(c, "duplicate")
            else:
                seen.add(_stem(c))
                kept.append(c)
    return kept, dropped
