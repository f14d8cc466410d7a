"""The embedding pipeline, from a stored image to a stored vector, and the sweeps that keep nothing lost.

upload (services.product_image_add) -> embed_images task (images_embed: decode, one forward pass per
batch, store the embedding) -> index_images task (indexing.index_apply: the single writer publishes the
vectors as a delta segment) -> searching processes pick the segment up (search.similar_images).

When the configured model changes, every image is re-embedded into the new identity's index, and
search switches over (catalog/serving.py) only once that index holds every image.
"""
import datetime
import logging
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from catalog.models import ProductImage, embedding_to_bytes
from catalog.queue import enqueue, queue_backlog
from catalog.serving import get_embedder, served_model
from catalog.suggestions import suggestions_after_embedding
from ml.fingerprint import perceptual_hash
from ml.images import ImageDecodeError, decode_image

logger = logging.getLogger(__name__)
Status = ProductImage.Status

# ----- embedding ---------------------------------------------------------------------------------

def _read_and_decode(image: ProductImage, min_side: int):
    try:
        with default_storage.open(image.file.name, "rb") as f:
            data = f.read()
    except (FileNotFoundError, OSError) as exc:
        raise ImageDecodeError(f"the stored file {image.file.name} cannot be read ({exc})") from exc
    pil, _ = decode_image(
        data, allowed_formats=frozenset(settings.IMAGE_ALLOWED_FORMATS), max_pixels=settings.IMAGE_MAX_PIXELS,
        min_side=min_side,
    )
    return pil


def images_embed(*, image_ids: list[int]) -> dict:
    """Embed the given images in one batch and queue them for indexing. Idempotent.

    Images already embedded by the configured model are not embedded again, only re-queued for
    indexing; images that cannot be decoded end `failed` with the reason.
    """
    model = get_embedder()
    identity = model.identity.key
    images = list(ProductImage.objects.filter(id__in=image_ids).order_by("id"))
    done = [i.pk for i in images if i.model_identity == identity and i.embedding is not None]
    done_ids = set(done)
    todo = [i for i in images if i.pk not in done_ids]
    ProductImage.objects.filter(id__in=[i.pk for i in todo]).update(
        status=Status.PROCESSING, updated_at=timezone.now()
    )

    decoded, failed = [], 0
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(todo)))) as pool:
        results = pool.map(lambda img: _try(lambda: _read_and_decode(img, model.min_side)), todo)
        for image, (pil, error) in zip(todo, results):
            if error is not None:
                failed += 1
                ProductImage.objects.filter(pk=image.pk).update(
                    status=Status.FAILED, error=str(error), updated_at=timezone.now()
                )
            else:
                decoded.append((image, pil))

    embedded = []
    for start in range(0, len(decoded), settings.EMBED_BATCH_SIZE):
        batch = decoded[start:start + settings.EMBED_BATCH_SIZE]
        result = model.embed([pil for _, pil in batch])
        with transaction.atomic():  # one commit per batch, not per image
            _store_embeddings(batch, result, identity)
        embedded += [image.pk for image, _ in batch]
        # Work that rides on the same forward pass: category suggestions for uncategorized products.
        suggestions_after_embedding(images=[image for image, _ in batch], vectors=result.vectors, identity=identity)

    to_index = done + embedded
    if to_index:
        enqueue("index_images", add_ids=to_index, model=served_model(model))
    return {"embedded": len(embedded), "already": len(done), "failed": failed}


def _store_embeddings(batch, result, identity: str) -> None:
    for (image, pil), vector, labels in zip(batch, result.vectors, result.labels):
        ProductImage.objects.filter(pk=image.pk).update(
            embedding=embedding_to_bytes(vector),
            phash=perceptual_hash(pil),
            model_identity=identity,
            labels=[{"label": label, "score": round(float(score), 4)} for label, score in labels],
            error="",
            updated_at=timezone.now(),
        )


HASH_DECODE_SIDE = 256  # the hash looks at 32 x 32 pixels: any decode this large gives the same bits
HASH_BATCH = 500


def images_fill_hashes(*, on_progress=None) -> dict:
    """Perceptual hashes for the images that have none (embedded before hashes were taken, or whose vectors a
    promotion copied in): near-duplicates' second signal then applies to them too. Resumable: it only ever
    looks at images without one. Returns {"hashed", "unreadable"}."""
    pending = ProductImage.objects.filter(phash__isnull=True).exclude(status=Status.FAILED)
    total, hashed, unreadable, last = pending.count(), 0, 0, 0
    while batch := list(pending.filter(id__gt=last).order_by("id")[:HASH_BATCH]):
        with ThreadPoolExecutor(max_workers=4) as pool:
            decoded = pool.map(lambda img: _try(lambda: _read_and_decode(img, HASH_DECODE_SIDE)), batch)
            for image, (pil, error) in zip(batch, decoded):
                if error is None:
                    ProductImage.objects.filter(pk=image.pk).update(phash=perceptual_hash(pil))
                    hashed += 1
                else:
                    unreadable += 1
        last = batch[-1].pk
        if on_progress:
            on_progress(hashed + unreadable, total)
    return {"hashed": hashed, "unreadable": unreadable}


def _try(fn):
    try:
        return fn(), None
    except ImageDecodeError as exc:
        return None, exc


def images_mark_failed(*, image_ids: list[int], reason: str) -> int:
    """The last retry failed: say so on every image of the batch that is not done."""
    return ProductImage.objects.filter(id__in=image_ids).exclude(status=Status.INDEXED).update(
        status=Status.FAILED, error=reason[:2000], updated_at=timezone.now()
    )


# ----- keeping nothing lost ----------------------------------------------------------------------

def images_queue_embedding(*, image_ids: list[int]) -> int:
    """Queue images for embedding in batches; returns how many batches were queued."""
    queued = 0
    for start in range(0, len(image_ids), settings.EMBED_BATCH_SIZE):
        if enqueue("embed_images", image_ids=image_ids[start:start + settings.EMBED_BATCH_SIZE]):
            queued += 1
    return queued


def images_retry_failed(*, image_ids: list[int]) -> int:
    """Queue failed images for embedding again (after the cause was fixed: a model, a codec, a disk);
    returns how many. Each goes back to pending, its error kept until the new attempt ends."""
    failed = list(ProductImage.objects.filter(id__in=image_ids, status=Status.FAILED).values_list("id", flat=True))
    ProductImage.objects.filter(id__in=failed).update(status=Status.PENDING, updated_at=timezone.now())
    images_queue_embedding(image_ids=failed)
    return len(failed)


def images_requeue_stale() -> dict:
    """Queue again images stuck pending or processing (a lost message, a broker outage, a dead worker)."""
    if queue_backlog("embed"):
        return {"requeued": 0}  # work is flowing: queued images are not stale, only waiting
    cutoff = timezone.now() - datetime.timedelta(seconds=settings.STALE_IMAGE_SECONDS)
    stale = list(
        ProductImage.objects.filter(status__in=[Status.PENDING, Status.PROCESSING], updated_at__lt=cutoff)
        .order_by("id").values_list("id", flat=True)[:10_000]
    )
    if stale:
        ProductImage.objects.filter(id__in=stale).update(updated_at=timezone.now())
        images_queue_embedding(image_ids=stale)
    return {"requeued": len(stale)}


def images_reembed_for_current_model() -> int:
    """Queue every image not yet embedded by the configured model (after a backbone switch)."""
    identity = get_embedder().identity.key
    ids = list(
        ProductImage.objects.exclude(status=Status.FAILED).exclude(model_identity=identity)
        .order_by("id").values_list("id", flat=True)
    )
    images_queue_embedding(image_ids=ids)
    return len(ids)
