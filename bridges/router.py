"""Beyond CLIP's router: a multinomial naive Bayes text classifier that decides whether an
instruction asks for an image ("draw": adapter + mapper -> SD) or not ("chat": plain LLM).

Pure python. The model is stored as counts (exact integers), so a JSON round trip reproduces
its probabilities bit for bit.
"""
import math
import re
from collections import Counter

FORMAT = "beyond_clip.naive_bayes_router"
VERSION = 1

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text, bigrams=True):
    """Lowercase word tokens, plus adjacent word pairs ("how do", "draw me") when `bigrams`."""
    words = _WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])] if bigrams else words


class NaiveBayesRouter:
    """Multinomial naive Bayes with Laplace (add-alpha) smoothing, scored in log space.

    Tokens never seen in training are ignored (they carry no evidence for any label).
    """

    def __init__(self, alpha=1.0, bigrams=True):
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.bigrams = bool(bigrams)
        self.doc_counts = {}    # label -> number of training texts
        self.token_counts = {}  # label -> {token: count}
        self._index()

    def _index(self):
        """Derived tables: labels, vocabulary, per-label totals."""
        self.labels = sorted(self.doc_counts)
        self.vocab = set().union(*self.token_counts.values()) if self.token_counts else set()
        self._totals = {label: sum(self.token_counts[label].values()) for label in self.labels}

    def fit(self, texts, labels):
        texts, labels = list(texts), list(labels)
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise ValueError("fit() needs at least one example")
        self.doc_counts = dict(Counter(str(label) for label in labels))
        self.token_counts = {label: Counter() for label in self.doc_counts}
        for text, label in zip(texts, labels):
            self.token_counts[str(label)].update(tokenize(text, self.bigrams))
        self.token_counts = {label: dict(counts) for label, counts in self.token_counts.items()}
        self._index()
        return self

    def log_scores(self, text):
        """Unnormalised log P(label) + sum log P(token | label) for each label."""
        if not self.labels:
            raise RuntimeError("the router is not trained: call fit() or from_dict() first")
        tokens = [t for t in tokenize(text, self.bigrams) if t in self.vocab]
        n_docs = sum(self.doc_counts.values())
        scores = {}
        for label in self.labels:
            counts = self.token_counts[label]
            scores[label] = math.log(self.doc_counts[label] / n_docs)
            if tokens:  # (with no known token the prior decides; an empty vocabulary has no denominator)
                log_denominator = math.log(self._totals[label] + self.alpha * len(self.vocab))
                scores[label] += sum(math.log(counts.get(t, 0) + self.alpha) - log_denominator for t in tokens)
        return scores

    def predict_proba(self, text):
        scores = self.log_scores(text)
        top = max(scores.values())  # log-sum-exp, shifted for stability
        exps = {label: math.exp(s - top) for label, s in scores.items()}
        total = sum(exps.values())
        return {label: e / total for label, e in exps.items()}

    def predict(self, text):
        """(most probable label, its probability); ties go to the first label in sorted order."""
        proba = self.predict_proba(text)
        label = max(self.labels, key=lambda name: proba[name])
        return label, proba[label]

    def to_dict(self):
        return {"format": FORMAT, "version": VERSION, "alpha": self.alpha, "bigrams": self.bigrams,
                "doc_counts": dict(self.doc_counts),
                "token_counts": {label: dict(c) for label, c in self.token_counts.items()}}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise ValueError(f"router data must be a dict, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"not a router file: format is {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("version") != VERSION:
            raise ValueError(f"unsupported router version {d.get('version')!r} (this code reads {VERSION})")
        missing = {"alpha", "bigrams", "doc_counts", "token_counts"} - d.keys()
        if missing:
            raise ValueError(f"router data lacks {sorted(missing)}")
        doc_counts, token_counts = d["doc_counts"], d["token_counts"]
        if not isinstance(doc_counts, dict) or not doc_counts:
            raise ValueError("router data: doc_counts must be a non-empty {label: count} dict")
        if not isinstance(token_counts, dict) or set(token_counts) != set(doc_counts):
            raise ValueError("router data: token_counts must have exactly the labels of doc_counts")
        if not all(_is_count(n) and n > 0 for n in doc_counts.values()):
            raise ValueError("router data: doc_counts must be positive integers")
        for label, counts in token_counts.items():
            if not isinstance(counts, dict) or not all(
                    isinstance(t, str) and _is_count(n) for t, n in counts.items()):
                raise ValueError(f"router data: token_counts[{label!r}] must be a {{token: int}} dict")
        alpha, bigrams = d["alpha"], d["bigrams"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"router data: alpha must be a number > 0, got {alpha!r}")
        if not isinstance(bigrams, bool):
            raise ValueError(f"router data: bigrams must be true or false, got {bigrams!r}")
        router = cls(alpha=alpha, bigrams=bigrams)
        router.doc_counts = dict(doc_counts)
        router.token_counts = {label: dict(c) for label, c in token_counts.items()}
        router._index()
        return router


def _is_count(n):
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0
