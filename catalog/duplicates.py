"""Near-duplicates across products: found when an image is indexed, listed in groups, merged or dismissed.

A catalog accumulates the same photo under several products (re-uploads, variants, supplier copies). When
the index writer adds images, each one's nearest neighbours of *other* products scoring at least
`VISUALSEARCH_DUPLICATE_SCORE` become open pairs, and so do those from `VISUALSEARCH_DUPLICATE_HASH_SCORE` up
whose perceptual hashes agree (`ml/fingerprint.py`); a catalog admin merges them (the images move to one
product, the other is deactivated) or says they are not duplicates, which is remembered.
"""
import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from catalog.models import DuplicatePair, Product, ProductImage
from catalog.services import product_image_delete
from ml.fingerprint import hash_distance

NEIGHBOURS = 8  # looked at per new image


def duplicates_record(*, index, ids: np.ndarray, vectors: np.ndarray) -> int:
    """Record the open pairs of the images just indexed (`ids`, their `vectors`); returns how many are new.

    A pair is another product's image among the nearest neighbours at cosine >= `DUPLICATE_SCORE`, or at
    cosine >= `DUPLICATE_HASH_SCORE` with perceptual hashes at most `DUPLICATE_HASH_BITS` apart (a much
    smaller copy, which the embedding sees blurred). A pair seen before keeps its status: one dismissed
    stays dismissed."""
    if not len(ids):
        return 0
    scores, found = index.search(vectors, min(NEIGHBOURS + 1, len(index)))
    floor = min(settings.DUPLICATE_SCORE, settings.DUPLICATE_HASH_SCORE)
    close = {}
    for image, row_scores, row_ids in zip(ids.tolist(), scores, found):
        for score, other in zip(row_scores.tolist(), row_ids.tolist()):
            if other >= 0 and other != image and score >= floor:
                key = (min(image, other), max(image, other))
                close[key] = max(score, close.get(key, -1.0))
    if not close:
        return 0
    images = {pk: (product, phash) for pk, product, phash in ProductImage.objects
              .filter(id__in={i for pair in close for i in pair}).values_list("id", "product_id", "phash")}
    pairs = []
    for (a, b), score in close.items():
        if a not in images or b not in images or images[a][0] == images[b][0]:
            continue
        hashes = images[a][1], images[b][1]
        distance = hash_distance(*hashes) if None not in hashes else None
        if score >= settings.DUPLICATE_SCORE or (distance is not None and distance <= settings.DUPLICATE_HASH_BITS):
            pairs.append(DuplicatePair(image_id=a, other_id=b, score=round(score, 4), hash_distance=distance))
    # Counted among these images' pairs only, never over the whole table: this runs on every index update.
    known = set(DuplicatePair.objects.filter(image_id__in={pair.image_id for pair in pairs})
                .values_list("image_id", "other_id"))
    DuplicatePair.objects.bulk_create(pairs, ignore_conflicts=True)
    return sum((pair.image_id, pair.other_id) not in known for pair in pairs)


def duplicate_groups(*, limit: int = 500) -> list[dict]:
    """Open pairs of active products joined into groups (images linked by any pair), best score first:
    [{"score", "images": [{"id", "product": {"id", "sku", "title"}}]}]."""
    pairs = list(DuplicatePair.objects.filter(status=DuplicatePair.Status.OPEN, image__product__is_active=True,
                                              other__product__is_active=True)
                 .values_list("image_id", "other_id", "score"))
    parent: dict[int, int] = {}

    def root(node: int) -> int:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b, _ in pairs:
        parent[root(a)] = root(b)
    best: dict[int, float] = {}
    for a, _, score in pairs:
        best[root(a)] = max(score, best.get(root(a), -1.0))
    members: dict[int, list[int]] = {}
    for node in parent:
        members.setdefault(root(node), []).append(node)
    images = {image.pk: image for image in ProductImage.objects.filter(id__in=list(parent)).select_related("product")}
    groups = [
        {"score": best[group], "images": [
            {"id": pk, "product": {"id": images[pk].product_id, "sku": images[pk].product.sku,
                                   "title": images[pk].product.title}}
            for pk in sorted(nodes) if pk in images]}
        for group, nodes in members.items()
    ]
    groups.sort(key=lambda group: (-group["score"], group["images"][0]["id"]))
    return groups[:limit]


def duplicate_warnings(*, image_ids: list[int]) -> dict[int, str]:
    """{image id: "looks like image N of product SKU (score)"} for those of `image_ids` in an open pair."""
    warnings: dict[int, str] = {}
    chosen = set(image_ids)
    rows = (DuplicatePair.objects.filter(Q(image_id__in=image_ids) | Q(other_id__in=image_ids),
                                         status=DuplicatePair.Status.OPEN)
            .select_related("image__product", "other__product").order_by("-score"))
    for pair in rows:
        for mine, theirs in ((pair.image, pair.other), (pair.other, pair.image)):
            if mine.pk in chosen and mine.pk not in warnings:
                warnings[mine.pk] = (f"looks like image {theirs.pk} of product {theirs.product.sku} "
                                     f"(near-duplicate score {pair.score:.3f})")
    return warnings


@transaction.atomic
def duplicate_merge(*, pair: DuplicatePair, keep: Product) -> Product:
    """Merge the pair's other product into `keep`: its images move there (a byte-identical one is dropped),
    it is deactivated, and its open pairs are closed as merged."""
    products = {pair.image.product_id, pair.other.product_id}
    if keep.pk not in products:
        raise ValidationError({"keep": f"product {keep.sku} is not one of this pair's products"})
    (gone_id,) = products - {keep.pk}
    gone = Product.objects.select_for_update().get(pk=gone_id)
    kept = set(keep.images.values_list("sha256", flat=True))
    for image in gone.images.all():
        if image.sha256 in kept:
            product_image_delete(image=image)  # its file and its index entry go too
        else:
            ProductImage.objects.filter(pk=image.pk).update(product=keep, updated_at=timezone.now())
    Product.objects.filter(pk=gone.pk).update(is_active=False, updated_at=timezone.now())
    DuplicatePair.objects.filter(Q(image__product=keep) & Q(other__product=keep), status=DuplicatePair.Status.OPEN
                                 ).update(status=DuplicatePair.Status.MERGED, updated_at=timezone.now())
    DuplicatePair.objects.filter(pk=pair.pk).update(status=DuplicatePair.Status.MERGED, updated_at=timezone.now())
    return keep


def duplicate_dismiss(*, pair: DuplicatePair) -> None:
    """Not duplicates: the pair is never listed again, even when its images are indexed again."""
    DuplicatePair.objects.filter(pk=pair.pk).update(status=DuplicatePair.Status.NOT_DUPLICATES,
                                                    updated_at=timezone.now())
