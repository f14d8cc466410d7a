"""Category suggestions on a real categorized image set: the service's category head against a plain baseline.

    .venv/bin/python benchmarks/categorizer_quality.py [--seeds 5] [--variants]

The images are Debian's ``tuxpaint-stamps-default`` (about 800 PNG stamps, category = the first
folder under ``stamps/``); the script downloads and unpacks the package into ``benchmarks/.cache/``
when it is missing (``apt-get download``, no root needed). A stamp and its ``_mirror`` twin are one
product, so they are always on the same side of the split.

Embeddings come from EfficientNet-Lite0 with its real ImageNet weights, decoded and preprocessed as the
service does (cached in ``benchmarks/.cache/``). On the same held-out products
(``ml.categorizer.holdout_split``, one split per seed) it prints top-1 and top-5 of:

- baseline: scikit-learn ``LogisticRegression()`` fitted on the training products' embeddings;
- service: ``ml.categorizer.train_category_head`` on the training products, as ``manage.py
  train_categorizer`` runs it (penalty and temperature chosen by grouped cross-fitting);

with how well each one's scores are calibrated (what a threshold of 0.8 means, expected calibration
error). ``--variants`` adds two improvements the service does not use because they did not help here:
averaging each image's probabilities with its mirror image's, and blending in a nearest-neighbour vote.

Last, the integrity check: 15 products get a wrong category, and the service's cross-fitted check heads
(``ml.category_audit``) judge every product.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml import category_audit  # noqa: E402
from ml.categorizer import holdout_split, train_category_head  # noqa: E402
from ml.evaluation import classification_metrics  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
PACKAGE = "tuxpaint-stamps-default"
STAMPS = CACHE / "tuxpaint" / "usr" / "share" / "tuxpaint" / "stamps"
BACKBONE = "efficientnet_lite0"


def fetch_stamps() -> Path:
    """The unpacked stamps folder, downloading and unpacking the Debian package when missing."""
    if STAMPS.is_dir():
        return STAMPS
    CACHE.mkdir(parents=True, exist_ok=True)
    debs = sorted(CACHE.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        download = subprocess.run(["apt-get", "download", PACKAGE], cwd=CACHE, capture_output=True, text=True)
        if download.returncode != 0:
            print("apt-get download failed; updating the package lists and trying again", file=sys.stderr)
            subprocess.run(["apt-get", "update"], check=True)
            subprocess.run(["apt-get", "download", PACKAGE], cwd=CACHE, check=True)
        debs = sorted(CACHE.glob(f"{PACKAGE}_*.deb"))
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(CACHE / "tuxpaint")], check=True)
    if not STAMPS.is_dir():
        raise SystemExit(f"{debs[-1].name} unpacked, but there is no {STAMPS}")
    return STAMPS


def stamp_catalog(stamps: Path) -> tuple[list[Path], list[str], list[str]]:
    """(PNG paths, category per path, product per path), sorted by path."""
    paths = sorted(stamps.rglob("*.png"))
    categories = [path.relative_to(stamps).parts[0] for path in paths]
    products = [str(path.relative_to(stamps).with_suffix("")).removesuffix("_mirror") for path in paths]
    return paths, categories, products


def embed_stamps(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, str]:
    """(vectors, vectors of the mirrored images, model identity), cached beside the images."""
    from PIL import ImageOps

    from ml.embedder import load_embedder
    from ml.images import decode_image

    model = load_embedder(BACKBONE, "imagenet")
    digest = hashlib.sha256("\n".join(str(p) for p in paths).encode() + model.identity.key.encode()).hexdigest()[:12]
    cached = CACHE / f"stamps-{digest}.npz"
    if cached.exists():
        with np.load(cached) as data:
            return data["vectors"], data["mirrored"], model.identity.key
    started = time.perf_counter()
    images = [decode_image(path.read_bytes(), min_side=model.min_side)[0] for path in paths]
    vectors = model.embed(images).vectors
    mirrored = model.embed([ImageOps.mirror(image) for image in images]).vectors
    print(f"embedded {2 * len(images)} images with {model.identity.key} in {time.perf_counter() - started:.0f} s")
    np.savez(cached, vectors=vectors, mirrored=mirrored)
    return vectors, mirrored, model.identity.key


def baseline_probabilities(vectors, labels, train, test, categories) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter
        model = LogisticRegression(max_iter=2000).fit(vectors[train], [labels[i] for i in train])
    probabilities = np.zeros((len(test), len(categories)))
    probabilities[:, [categories.index(c) for c in model.classes_]] = model.predict_proba(vectors[test])
    return probabilities


def head_probabilities(head, vectors, categories) -> np.ndarray:
    """The head's probabilities with columns in ``categories`` order (a category absent from training: 0)."""
    probabilities = np.zeros((len(vectors), len(categories)))
    probabilities[:, [categories.index(c) for c in head.categories]] = head.probabilities(vectors)
    return probabilities


def neighbour_probabilities(vectors, labels, train, test, categories, k: int = 10, sharpness: float = 0.05):
    """Votes of the k most similar training images, weighted exp((cosine - 1) / sharpness)."""
    similarity = vectors[test] @ vectors[train].T
    nearest = np.argsort(-similarity, axis=1)[:, :k]
    votes = np.full((len(test), len(categories)), 1e-3)
    for row, columns in enumerate(nearest):
        for column in columns:
            votes[row, categories.index(labels[train[column]])] += np.exp((similarity[row, column] - 1) / sharpness)
    return votes / votes.sum(axis=1, keepdims=True)


def scores(true_labels, probabilities, categories, threshold: float = 0.8) -> dict:
    """top1, top5, and what `threshold` means: precision and coverage of top predictions reaching it, and ECE."""
    metrics = classification_metrics(true_labels, probabilities, categories)
    top = probabilities.max(axis=1)
    correct = np.array([categories[i] == t for i, t in zip(probabilities.argmax(axis=1), true_labels)])
    row = category_audit.threshold_table(top, correct, [threshold])[0]
    bins = np.minimum((top * 10).astype(int), 9)
    ece = sum(abs(correct[bins == b].mean() - top[bins == b].mean()) * (bins == b).mean() for b in range(10) if (bins == b).any())
    return {"top1": metrics["top1"], "top5": metrics["top5"], "precision": row["precision"], "coverage": row["coverage"],
            "ece": float(ece)}


def integrity_check(vectors, labels, products, *, identity: str, wrong: int = 15, seed: int = 0) -> dict:
    """Give `wrong` products of the larger categories another one; how many does the service's check flag?"""
    rng = np.random.default_rng(seed)
    counts = {c: labels.count(c) for c in set(labels)}
    large = sorted(c for c, n in counts.items() if n >= 30)
    candidates = sorted({p for p, c in zip(products, labels) if c in large})
    mislabelled = {p: rng.choice([c for c in large if c != labels[products.index(p)]])
                   for p in rng.choice(candidates, wrong, replace=False)}
    given = [str(mislabelled.get(p, c)) for p, c in zip(products, labels)]
    product_number = {p: i for i, p in enumerate(dict.fromkeys(products))}  # as database ids would be
    ids = [product_number[p] for p in products]

    result = train_category_head(vectors, given, identity=identity, groups=ids)
    head = result.head
    check_heads = category_audit.fit_check_heads(vectors, given, ids, identity=identity, l2=result.metrics["l2"],
                                                 temperature=result.metrics["temperature"])
    own = {}
    for name, probabilities in (
        ("refit head", head.probabilities(vectors)),
        ("check heads", category_audit.cross_fitted_probabilities(check_heads, vectors, ids, head.categories)),
    ):
        product_ids, per_product = category_audit.mean_per_group(probabilities, ids)
        label = dict(zip(ids, given))
        own[name] = {p: row[head.categories.index(label[p])] for p, row in zip(product_ids, per_product)}
    wrong_ids = {product_number[p] for p in mislabelled}
    threshold = category_audit.UNLIKELY_THRESHOLD
    report = {"threshold": threshold, "wrong": len(wrong_ids), "products": len(own["check heads"])}
    for name, probability in own.items():
        flagged = {p for p, value in probability.items() if value < threshold}
        report[name] = {"caught": len(flagged & wrong_ids), "others_flagged": len(flagged - wrong_ids),
                        "median_wrong": float(np.median([probability[p] for p in wrong_ids]))}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="held-out splits to average over")
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--variants", action="store_true", help="also measure flip averaging and neighbour blending")
    args = parser.parse_args()

    paths, labels, products = stamp_catalog(fetch_stamps())
    vectors, mirrored, identity = embed_stamps(paths)
    categories = sorted(set(labels))
    print(f"{len(paths)} images, {len(set(products))} products, {len(categories)} categories, model {identity}")

    results: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        train, test = holdout_split(labels, groups=products, holdout=args.holdout, seed=seed)
        truth = [labels[i] for i in test]
        started = time.perf_counter()
        head = train_category_head(vectors[train], [labels[i] for i in train], identity=identity,
                                   groups=[products[i] for i in train], holdout=args.holdout, seed=seed).head
        seconds = time.perf_counter() - started
        service = head_probabilities(head, vectors[test], categories)
        runs = {
            "baseline": baseline_probabilities(vectors, labels, train, test, categories),
            "service": service,
        }
        if args.variants:
            runs["service + mirror averaging"] = (service + head_probabilities(head, mirrored[test], categories)) / 2
            runs["service + neighbour blend"] = 0.7 * service + 0.3 * neighbour_probabilities(
                vectors, labels, train, test, categories)
        for name, probabilities in runs.items():
            results.setdefault(name, []).append(scores(truth, probabilities, categories))
        print(f"seed {seed}: {len(train)} training and {len(test)} held-out images (head trained in {seconds:.0f} s): "
              + "  ".join(f"{name} {results[name][-1]['top1']:.3f}/{results[name][-1]['top5']:.3f}" for name in runs))

    print(f"\nmean over {args.seeds} held-out splits ({args.holdout:.0%} of each category's products):")
    print(f"{'':28s} {'top-1':>6s} {'top-5':>6s}   {'at 0.8: precision':>17s} {'coverage':>8s} {'ECE':>6s}")
    for name, rows in results.items():
        mean = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
        print(f"{name:28s} {mean['top1']:6.3f} {mean['top5']:6.3f}   {mean['precision']:17.3f} "
              f"{mean['coverage']:8.3f} {mean['ece']:6.3f}")

    check = integrity_check(vectors, labels, products, identity=identity)
    print(f"\nintegrity check: {check['wrong']} of {check['products']} products given a wrong category; "
          f"flagged when their own category gets under {check['threshold']}:")
    for name in ("refit head", "check heads"):
        row = check[name]
        print(f"  {name:12s} caught {row['caught']}/{check['wrong']} (median probability {row['median_wrong']:.3f}), "
              f"flagged {row['others_flagged']} of the other {check['products'] - check['wrong']}")


if __name__ == "__main__":
    main()
