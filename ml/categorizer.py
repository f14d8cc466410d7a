"""The category head: the catalog's own categories predicted from image embeddings.

``train_category_head`` learns from the embeddings of products that already have a
category. It holds out a stratified share of products (all images of one product on
one side) and trains a multinomial logistic head on the rest. The penalty and a
softmax temperature are chosen on out-of-fold predictions of the training products
(grouped 3-fold cross-fitting), which minimises log-loss: temperature scaling. It
reports top-1/top-5, per-category precision and recall and the confusion matrix on the
held-out share, then refits the head on all the data with the same settings.

Calibration is what makes ``unsure_threshold`` mean what it says: among predictions
whose top probability is about 0.6, about 60% are right.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml.evaluation import classification_metrics
from ml.files import atomic_write

DEFAULT_UNSURE_THRESHOLD = 0.5
RETRAIN_HINT = "retrain the category head for the current model"

_FORMAT = 1
# Penalty: mean log-loss + l2/2 |W|^2 on inputs scaled to unit average variance;
# strongest first. Per example, so the refit on more data keeps the logit scale the
# temperature was fitted to.
_L2_GRID = (3.0, 1.0, 0.3, 0.1, 0.03)
_DEFAULT_L2 = 0.1  # when there are too few products to choose
_FOLDS = 3
_MAX_ITERATIONS = 100
_SMALL_PROBLEM = 20_000_000  # inputs x categories below which one thread fits fastest


class CategoryHeadError(Exception):
    """A saved category head cannot be used; ``str(e)`` says what to do."""


@dataclass(frozen=True)
class Prediction:
    """Top categories for one vector, best first, with calibrated probabilities."""

    choices: tuple[tuple[str, float], ...]
    unsure: bool

    @property
    def category(self) -> str:
        return self.choices[0][0]

    @property
    def probability(self) -> float:
        return self.choices[0][1]


@dataclass(frozen=True)
class TrainResult:
    head: CategoryHead
    metrics: dict


class CategoryHead:
    """softmax((((x - mean) / scale) @ weights + bias) / temperature) over ``categories``."""

    def __init__(
        self,
        *,
        identity: str,
        categories: list[str],
        weights: np.ndarray,
        bias: np.ndarray,
        mean: np.ndarray,
        scale: np.ndarray,
        temperature: float = 1.0,
        unsure_threshold: float = DEFAULT_UNSURE_THRESHOLD,
        created_at: str | None = None,
    ) -> None:
        self.identity = identity
        self.categories = list(categories)
        self.weights = np.asarray(weights, dtype=np.float32)
        self.bias = np.asarray(bias, dtype=np.float32)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.scale = np.asarray(scale, dtype=np.float32)
        self.temperature = float(temperature)
        self.unsure_threshold = float(unsure_threshold)
        self.created_at = created_at or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        dim, count = self.weights.shape
        if count != len(self.categories) or self.bias.shape != (count,):
            raise ValueError(f"weights {self.weights.shape} and bias {self.bias.shape} do not fit {count} categories")
        if self.mean.shape != (dim,) or self.scale.shape != (dim,):
            raise ValueError(f"mean {self.mean.shape} and scale {self.scale.shape} do not fit dimension {dim}")

    def __repr__(self) -> str:
        return f"<CategoryHead {self.identity} {len(self.categories)} categories d={self.dim} version={self.version}>"

    @property
    def dim(self) -> int:
        return self.weights.shape[0]

    @property
    def version(self) -> str:
        """A hash of everything that decides predictions: equal versions predict alike."""
        digest = hashlib.sha256()
        for array in (self.weights, self.bias, self.mean, self.scale):
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(json.dumps([self.identity, self.categories, self.temperature, self.unsure_threshold]).encode())
        return digest.hexdigest()[:16]

    def probabilities(self, vectors) -> np.ndarray:
        """(n, categories) calibrated probabilities, columns in ``categories`` order."""
        return _softmax(self._logits(self._as_vectors(vectors)) / self.temperature)

    def predict(self, vectors, k: int = 5, *, unsure_threshold: float | None = None) -> list[Prediction]:
        """The top ``k`` categories of each vector; ``unsure`` when the best is below the threshold."""
        threshold = self.unsure_threshold if unsure_threshold is None else unsure_threshold
        probabilities = self.probabilities(vectors)
        top = np.argsort(-probabilities, axis=1, kind="stable")[:, : max(1, min(k, len(self.categories)))]
        return [
            Prediction(
                choices=tuple((self.categories[c], float(row[c])) for c in order),
                unsure=bool(row[order[0]] < threshold),
            )
            for row, order in zip(probabilities, top)
        ]

    def predict_one(self, vector, k: int = 5, *, unsure_threshold: float | None = None) -> Prediction:
        return self.predict(np.asarray(vector)[None, :], k, unsure_threshold=unsure_threshold)[0]

    def _logits(self, vectors: np.ndarray) -> np.ndarray:
        return ((vectors - self.mean) / self.scale) @ self.weights + self.bias

    def _as_vectors(self, vectors) -> np.ndarray:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(
                f"expected vectors of shape (n, {self.dim}) from model {self.identity!r}, got {vectors.shape}"
            )
        return _normalized(vectors)

    # ----- files ------------------------------------------------------------------------

    def save(self, path) -> str:
        """Write the head atomically (npz with a JSON header, no pickle); returns its version."""
        meta = {
            "format": _FORMAT,
            "version": self.version,
            "identity": self.identity,
            "categories": self.categories,
            "dimension": self.dim,
            "temperature": self.temperature,
            "unsure_threshold": self.unsure_threshold,
            "created_at": self.created_at,
        }
        buffer = io.BytesIO()
        np.savez(
            buffer,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            weights=self.weights,
            bias=self.bias,
            mean=self.mean,
            scale=self.scale,
        )
        atomic_write(Path(path), lambda f: f.write(buffer.getvalue()))
        return self.version

    @classmethod
    def load(cls, path, *, expected_identity: str | None = None) -> CategoryHead:
        """Read a saved head; refuses an unreadable file or one trained on another model."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(data["meta"].tobytes())
                arrays = {name: data[name] for name in ("weights", "bias", "mean", "scale")}
        except FileNotFoundError:
            raise CategoryHeadError(f"no category head at {path}; train one first") from None
        except Exception as exc:  # zip, npy and JSON errors all mean the same thing here
            raise CategoryHeadError(f"category head {path} is unreadable ({exc}); {RETRAIN_HINT}") from exc
        if meta.get("format") != _FORMAT:
            raise CategoryHeadError(f"category head {path} has unknown format {meta.get('format')!r}; {RETRAIN_HINT}")
        if expected_identity is not None and meta["identity"] != expected_identity:
            raise CategoryHeadError(
                f"category head {path} was trained on embeddings of {meta['identity']!r}, but this service "
                f"embeds with {expected_identity!r}; {RETRAIN_HINT}"
            )
        try:
            head = cls(
                identity=meta["identity"],
                categories=meta["categories"],
                temperature=meta["temperature"],
                unsure_threshold=meta["unsure_threshold"],
                created_at=meta["created_at"],
                **arrays,
            )
        except (KeyError, ValueError) as exc:
            raise CategoryHeadError(f"category head {path} is inconsistent ({exc}); {RETRAIN_HINT}") from exc
        if head.version != meta["version"] or head.dim != meta["dimension"]:
            raise CategoryHeadError(f"category head {path} does not match its recorded version; {RETRAIN_HINT}")
        return head


# ----- training ---------------------------------------------------------------------------


def train_category_head(
    vectors,
    labels: list[str],
    *,
    identity: str,
    holdout: float = 0.2,
    seed: int = 0,
    groups: list | None = None,
    unsure_threshold: float = DEFAULT_UNSURE_THRESHOLD,
) -> TrainResult:
    """Train on labelled embeddings; metrics come from a held-out split, the head from all data.

    ``groups`` (e.g. product ids) keeps every image of a product on one side of each
    split. A category with a single group cannot be held out: it is trained on and
    listed in ``metrics["untested_categories"]``.
    """
    vectors = _normalized(np.asarray(vectors))
    labels = [str(label) for label in labels]
    groups = list(range(len(labels))) if groups is None else list(groups)
    if vectors.ndim != 2 or len(vectors) != len(labels) or len(groups) != len(labels):
        raise ValueError(
            f"need one label and one group per vector: {vectors.shape} vectors, "
            f"{len(labels)} labels, {len(groups)} groups"
        )
    categories = sorted(set(labels))
    if len(categories) < 2:
        raise ValueError(f"need at least two categories to train a head, got {categories}")
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be between 0 and 1, got {holdout}")
    position = {category: i for i, category in enumerate(categories)}
    targets = np.array([position[label] for label in labels])

    train, test = holdout_split(labels, groups=groups, holdout=holdout, seed=seed)
    train_groups = [groups[i] for i in train]
    l2, temperature = _choose_settings(vectors[train], targets[train], train_groups, len(categories), seed)
    evaluated = _fit(vectors[train], targets[train], len(categories), l2)
    proba = _softmax(evaluated.logits(vectors[test]) / temperature)
    metrics = classification_metrics([labels[i] for i in test], proba, categories)
    metrics.update(
        n_train=int(len(train)),
        n_test=int(len(test)),
        untested_categories=[c for c in categories if metrics["per_category"][c]["support"] == 0],
        temperature=temperature,
        l2=l2,
    )

    head = fit_category_head(
        vectors, labels, identity=identity, l2=l2, temperature=temperature, unsure_threshold=unsure_threshold
    )
    return TrainResult(head=head, metrics=metrics)


def fit_category_head(
    vectors,
    labels: list[str],
    *,
    identity: str,
    l2: float,
    temperature: float,
    unsure_threshold: float = DEFAULT_UNSURE_THRESHOLD,
) -> CategoryHead:
    """A head fitted on all of ``vectors`` with settings a ``train_category_head`` run chose
    (its ``metrics["l2"]`` and ``metrics["temperature"]``): no search, no evaluation.

    For cross-fitting: e.g. one head per fold of products, each judging the products it never saw.
    Its categories are the labels present, sorted.
    """
    vectors = _normalized(np.asarray(vectors))
    labels = [str(label) for label in labels]
    categories = sorted(set(labels))
    if vectors.ndim != 2 or len(vectors) != len(labels):
        raise ValueError(f"need one label per vector: {vectors.shape} vectors, {len(labels)} labels")
    if len(categories) < 2:
        raise ValueError(f"need at least two categories to fit a head, got {categories}")
    position = {category: i for i, category in enumerate(categories)}
    fitted = _fit(vectors, np.array([position[label] for label in labels]), len(categories), l2)
    return CategoryHead(
        identity=identity,
        categories=categories,
        weights=fitted.weights,
        bias=fitted.bias,
        mean=fitted.mean,
        scale=fitted.scale,
        temperature=temperature,
        unsure_threshold=unsure_threshold,
    )


def holdout_split(labels, *, groups=None, holdout: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, test) indices with whole groups on one side.

    Each group goes with its most common label; per category, ``round(holdout * groups)``
    of its groups are held out, at least one and never all of them. A category with one
    group stays wholly in training.
    """
    members, by_category = _groups_by_category(labels, groups)
    rng = np.random.default_rng(seed)
    held_out = []
    for category in sorted(by_category):
        category_groups = by_category[category]
        if len(category_groups) < 2:
            continue
        count = min(max(1, round(holdout * len(category_groups))), len(category_groups) - 1)
        held_out.extend(category_groups[i] for i in rng.permutation(len(category_groups))[:count])
    test = np.sort(np.array([i for group in held_out for i in members[group]], dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def _group_folds(labels, groups, folds: int, seed: int) -> np.ndarray:
    """A fold number per row, stratified by category with whole groups per fold.

    Rows of a category with a single group get -1: they are always trained on, never
    predicted out of fold (no model could have seen their category).
    """
    members, by_category = _groups_by_category(labels, groups)
    rng = np.random.default_rng(seed)
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    offset = 0
    for category in sorted(by_category):
        category_groups = by_category[category]
        if len(category_groups) < 2:
            continue
        for position, i in enumerate(rng.permutation(len(category_groups))):
            fold_of[members[category_groups[i]]] = (offset + position) % folds
        offset += len(category_groups)  # so small categories do not all land in fold 0
    return fold_of


def _groups_by_category(labels, groups) -> tuple[dict, dict]:
    """{group: row indices} and {category: groups}, each group under its most common label."""
    labels = list(labels)
    groups = list(range(len(labels))) if groups is None else list(groups)
    members: dict = defaultdict(list)
    votes: dict = defaultdict(Counter)
    for i, (label, group) in enumerate(zip(labels, groups)):
        members[group].append(i)
        votes[group][label] += 1
    by_category: dict = defaultdict(list)
    for group in members:  # first-seen order, so the split does not depend on hashing
        by_category[votes[group].most_common(1)[0][0]].append(group)
    return members, by_category


@dataclass(frozen=True)
class _Fitted:
    weights: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    def logits(self, vectors: np.ndarray) -> np.ndarray:
        return ((vectors - self.mean) / self.scale) @ self.weights + self.bias


def _choose_settings(vectors, targets, groups, count: int, seed: int) -> tuple[float, float]:
    """(penalty, temperature) minimising out-of-fold log-loss, by grouped cross-fitting.

    Every training row gets a prediction from a model that never saw its product, so
    the temperature is fitted on all of them rather than on a small slice, which would
    leave it noisy.
    """
    fold_of = _group_folds(targets, groups, _FOLDS, seed + 1)
    scored = fold_of >= 0
    if not scored.any():
        return _DEFAULT_L2, 1.0
    out_of_fold = {l2: np.zeros((len(targets), count), dtype=np.float32) for l2 in _L2_GRID}
    for fold in range(_FOLDS):
        rows = fold_of == fold
        if not rows.any():
            continue
        start = None
        for l2 in _L2_GRID:  # each fit starts from the previous, more strongly penalised one
            fitted = _fit(vectors[~rows], targets[~rows], count, l2, start=start)
            start = (fitted.weights, fitted.bias)
            out_of_fold[l2][rows] = fitted.logits(vectors[rows])
    best = None
    for l2, logits in out_of_fold.items():
        temperature = _temperature(logits[scored], targets[scored])
        loss = _nll(logits[scored] / temperature, targets[scored])
        if best is None or loss < best[0]:
            best = (loss, l2, temperature)
    return best[1], best[2]


def _fit(vectors, targets, count: int, l2: float, *, start=None) -> _Fitted:
    mean = vectors.mean(axis=0)
    # One scale for all dimensions: per-dimension scaling would amplify the near-silent
    # dimensions embeddings have. Unit average variance keeps the penalty grid meaningful.
    scale = np.full(vectors.shape[1], max(float(np.sqrt(vectors.var(axis=0).mean())), 1e-6))
    weights, bias = _logistic((vectors - mean) / scale, targets, count, l2, start=start)
    return _Fitted(weights, bias, mean.astype(np.float32), scale.astype(np.float32))


def _logistic(x: np.ndarray, y: np.ndarray, count: int, l2: float, *, start=None) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression: mean cross-entropy + l2/2 |W|^2, full-batch L-BFGS.

    The problem is convex, so the result does not depend on ``start``, only the time taken.
    """
    import torch  # imported here: predicting needs only numpy

    features = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    target = torch.from_numpy(y.astype(np.int64))
    if start is None:
        start = (np.zeros((x.shape[1], count), np.float32), np.zeros(count, np.float32))
    weights = torch.tensor(start[0], requires_grad=True)
    bias = torch.tensor(start[1], requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights, bias], max_iter=_MAX_ITERATIONS, history_size=20, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weights + bias, target) + 0.5 * l2 * (weights**2).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    if x.size * count < _SMALL_PROBLEM:
        torch.set_num_threads(1)  # thread hand-offs cost far more than the arithmetic here
    try:
        optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return weights.detach().numpy().copy(), bias.detach().numpy().copy()


def _temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature minimising held-out negative log-likelihood, on a log grid refined twice."""
    low, high = np.log(0.05), np.log(20.0)
    for _ in range(3):
        grid = np.linspace(low, high, 41)
        losses = [_nll(logits / np.exp(t), targets) for t in grid]
        best = int(np.argmin(losses))
        step = grid[1] - grid[0]
        low, high = grid[best] - step, grid[best] + step
    return float(np.exp(grid[best]))


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probabilities[np.arange(len(targets)), targets].mean())


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _normalized(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
