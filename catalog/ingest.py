"""Bulk ingest jobs: a manifest (CSV or JSON Lines) and an optional ZIP of images become products and images.

upload (ingest_job_create: the whole manifest and the archive's directory are checked; nothing is stored
unless both are usable) -> start_ingest_job task (ingest_job_start: one IngestRow per manifest row, then
the rows queued in chunks) -> ingest_rows tasks (ingest_rows_process: each row stored in its own
transaction, new images queued for embedding in batches) -> the embedding pipeline -> ingest_job_refresh
(counters derived from the rows; the job finishes once every row is stored or failed and every image of
it is indexed or failed).

Every row's state is in the database, so a chunk delivered again after its worker died skips the rows
already done, and the same manifest ingested twice finds its products by sku and its images by hash.
"""
import logging
import re
import time
import zipfile
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from pathlib import PurePath
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files import File
from django.core.files.base import ContentFile
from django.db import IntegrityError, transaction
from django.db.models import Count, Max, Min, Q
from django.utils import timezone

from catalog import services
from catalog.archive import ArchiveReader, archive_check
from catalog.manifest import manifest_format, manifest_parse
from catalog.models import Category, IngestJob, IngestRow, Product, ProductImage
from catalog.pipeline import images_queue_embedding
from catalog.process_cache import ProcessCache
from catalog.queue import enqueue, queue_check
from catalog.remote import FetchError, fetch_url

logger = logging.getLogger(__name__)

MAX_SKU = Product._meta.get_field("sku").max_length
MAX_TITLE = Product._meta.get_field("title").max_length
MAX_ERRORS_SHOWN = 1000
# A batch of rows holds at most this many image bytes in memory before it is stored.
BATCH_BYTES = 64 * 1024 * 1024
URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

JobStatus = IngestJob.Status
RowStatus = IngestRow.Status
ImageStatus = ProductImage.Status


# One open archive per job per process: a worker takes the chunks of one job in a row, and reading a
# large ZIP's directory once per chunk would cost more than the chunk.
_readers: ProcessCache[tuple[int, str, str], ArchiveReader] = ProcessCache(
    "ingest archives", size=2, close=ArchiveReader.close
)


def _archive_reader(job: IngestJob) -> ArchiveReader | None:
    if not job.archive:
        return None
    return _readers.get(_reader_key(job), lambda: ArchiveReader(job.archive.storage.open(job.archive.name, "rb")))


def _reader_key(job: IngestJob) -> tuple[int, str, str]:
    return job.pk, job.archive.name, job.created_at.isoformat()


# ----- accepting a job ---------------------------------------------------------------------------

def ingest_job_create(
    *, manifest: File, archive: File | None = None, created_by=None, start: bool = True
) -> IngestJob:
    """Check and store an uploaded manifest (and archive) as a queued job under "ingest/<job id>/".

    The whole manifest and the archive's directory are checked first: a manifest without the required
    columns, not UTF-8, or an unsafe archive is a ValidationError and nothing is stored. With start=False
    the caller starts the job itself (ingest_job_start).
    """
    if manifest.size is not None and manifest.size > settings.INGEST_MAX_MANIFEST_BYTES:
        raise ValidationError({"manifest": f"the manifest is {manifest.size / 1e6:.1f} MB, over the "
                                           f"{settings.INGEST_MAX_MANIFEST_BYTES / 1e6:.1f} MB limit; split it"})
    manifest.seek(0)
    data = manifest.read(settings.INGEST_MAX_MANIFEST_BYTES + 1)
    if len(data) > settings.INGEST_MAX_MANIFEST_BYTES:
        raise ValidationError({"manifest": f"the manifest is over the {settings.INGEST_MAX_MANIFEST_BYTES / 1e6:.1f} "
                                           "MB limit; split it"})
    fmt = manifest_format(filename=manifest.name or "", data=data)
    manifest_parse(data=data, format=fmt)
    if archive is not None:
        archive.seek(0)
        archive_check(archive)
        archive.seek(0)
    if start:
        queue_check()  # accept nothing that cannot be queued: the client gets a 503 and retries

    with transaction.atomic():
        name = (manifest.name or "").replace("\\", "/").rsplit("/", 1)[-1]
        job = IngestJob.objects.create(manifest_format=fmt, manifest_name=name[:255], created_by=created_by)
        job.manifest.save(f"manifest.{fmt}", ContentFile(data), save=False)
        if archive is not None:
            job.archive.save("images.zip", archive, save=False)
        job.save(update_fields=["manifest", "archive"])
        if start:
            transaction.on_commit(lambda: ingest_job_queue(job_id=job.pk))
    job.refresh_from_db()
    return job


def ingest_job_queue(*, job_id: int) -> bool:
    return enqueue("start_ingest_job", job_id=job_id)


# ----- running a job -----------------------------------------------------------------------------

def ingest_job_start(*, job_id: int, queue_chunks: bool = True) -> list[tuple[int, int]]:
    """Turn a queued job's manifest into rows, mark it running and queue its rows in chunks.

    Returns the chunks as (first row, last row). Idempotent: rows created by an interrupted run are
    kept, and a start delivered again to a running job queues its pending rows again (the first
    delivery may have died before queueing them; rows already done are skipped by the chunks).
    With queue_chunks=False the caller runs the chunks itself (ingest_rows_process).
    """
    job = IngestJob.objects.filter(pk=job_id).first()
    if job is None or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        return []
    if job.status == JobStatus.RUNNING:
        chunks = _pending_chunks(job)
        if queue_chunks:
            _queue_chunks(job.pk, chunks)
        return chunks
    try:
        with job.manifest.open("rb") as f:
            manifest = manifest_parse(data=f.read(), format=job.manifest_format)
        if job.archive:
            with job.archive.open("rb") as f:
                archive_check(f)
    except ValidationError as exc:
        ingest_job_fail(job_id=job.pk, reason=_message(exc))
        return []
    except FileNotFoundError:
        ingest_job_fail(job_id=job.pk, reason="the uploaded manifest or archive is no longer in storage")
        return []

    with transaction.atomic():
        IngestRow.objects.bulk_create(
            [
                IngestRow(job=job, number=row.number, sku=row.fields.get("sku", "")[:200], data=row.fields,
                          status=RowStatus.FAILED if row.error else RowStatus.PENDING, error=row.error)
                for row in manifest.rows
            ],
            batch_size=1000, ignore_conflicts=True,
        )
        now = timezone.now()
        started = IngestJob.objects.filter(pk=job.pk, status=JobStatus.QUEUED).update(
            status=JobStatus.RUNNING, total=len(manifest.rows), started_at=now, updated_at=now
        )
    if not started:
        return []  # another delivery started it a moment ago
    chunks = _pending_chunks(job)
    if queue_chunks:
        _queue_chunks(job.pk, chunks)
    if not chunks:
        ingest_job_refresh(job=job)  # every row failed to parse: finished already
    return chunks


def _pending_chunks(job: IngestJob) -> list[tuple[int, int]]:
    numbers = list(job.rows.filter(status=RowStatus.PENDING).order_by("number").values_list("number", flat=True))
    size = max(1, settings.INGEST_CHUNK_ROWS)
    return [(numbers[i], numbers[min(i + size, len(numbers)) - 1]) for i in range(0, len(numbers), size)]


def _queue_chunks(job_id: int, chunks: list[tuple[int, int]]) -> None:
    for first, last in chunks:
        enqueue("ingest_rows", job_id=job_id, first=first, last=last)


def ingest_rows_process(*, job_id: int, first: int, last: int) -> dict:
    """Store the pending rows numbered first..last of a running job. Idempotent: done rows are skipped.

    Rows are stored in batches of EMBED_BATCH_SIZE, one transaction each (a savepoint per row, so a bad
    row fails alone), and each batch's new images are queued for embedding as one batch once it commits:
    a crash loses at most the batch in progress. Images are read (and fetched) before the transaction
    opens, so no lock is held during a download. The job's counters are refreshed at least every
    second. A chunk that runs long queues its remaining rows as a new chunk instead of reaching the
    task time limit.
    """
    job = IngestJob.objects.filter(pk=job_id).first()
    if job is None or job.status != JobStatus.RUNNING:
        return {"done": 0, "failed": 0, "skipped": True}
    rows = list(job.rows.filter(number__gte=first, number__lte=last, status=RowStatus.PENDING).order_by("number"))
    try:
        archive = _archive_reader(job)
    except (zipfile.BadZipFile, FileNotFoundError) as exc:
        ingest_job_fail(job_id=job.pk, reason=f"the stored archive cannot be read ({exc})")
        return {"done": 0, "failed": 0, "skipped": True}

    deadline = time.monotonic() + settings.CELERY_TASK_SOFT_TIME_LIMIT / 2
    refreshed = time.monotonic()
    categories: dict[str, Category] = {}
    totals = {"done": 0, "failed": 0}
    position = 0
    while position < len(rows):
        if time.monotonic() > deadline:
            _queue_chunks(job.pk, [(rows[position].number, last)])
            break
        batch, position = _rows_read(rows, position, archive, deadline)
        new_images = _rows_store(batch, categories, totals)
        images_queue_embedding(image_ids=new_images)
        if time.monotonic() - refreshed >= 1.0:
            ingest_job_refresh(job=job)
            refreshed = time.monotonic()
    ingest_job_refresh(job=job)
    return totals


@dataclass(frozen=True)
class _RowInput:
    sku: str
    title: str
    values: dict
    data: bytes
    filename: str


def _rows_read(rows: list[IngestRow], position: int, archive: ArchiveReader | None,
               deadline: float) -> tuple[list[tuple[IngestRow, "_RowInput | ValidationError"]], int]:
    """The next batch of rows with their image bytes (or the reason a row cannot be stored)."""
    batch, size = [], 0
    while (position < len(rows) and len(batch) < settings.EMBED_BATCH_SIZE and size < BATCH_BYTES
           and (not batch or time.monotonic() < deadline)):
        row = rows[position]
        position += 1
        try:
            item = _row_input(row, archive)
            size += len(item.data)
        except ValidationError as exc:
            item = exc
        batch.append((row, item))
    return batch, position


def _row_input(row: IngestRow, archive: ArchiveReader | None) -> _RowInput:
    values = row.data
    sku, title, image = values.get("sku", ""), values.get("title", ""), values.get("image", "")
    if not sku:
        raise ValidationError({"sku": "the sku is empty"})
    if len(sku) > MAX_SKU:
        raise ValidationError({"sku": f"the sku is {len(sku)} characters, over the limit of {MAX_SKU}"})
    if len(title) > MAX_TITLE:
        raise ValidationError({"title": f"the title is {len(title)} characters, over the limit of {MAX_TITLE}"})
    if not image:
        raise ValidationError({"image": "the image is empty; give a path inside the archive or an http(s) URL"})
    data, filename = _image_bytes(image, archive)
    return _RowInput(sku=sku, title=title, values=values, data=data, filename=filename)


def _rows_store(batch: list[tuple[IngestRow, "_RowInput | ValidationError"]], categories: dict,
                totals: dict) -> list[int]:
    """Store a batch of rows in one transaction; the ids of the images it added."""
    new_images = []
    with transaction.atomic():
        # A chunk delivered again while its first delivery still runs skips the rows that one holds.
        mine = set(
            IngestRow.objects.select_for_update(skip_locked=True)
            .filter(pk__in=[row.pk for row, _ in batch], status=RowStatus.PENDING).values_list("pk", flat=True)
        )
        for row, item in batch:
            if row.pk not in mine:
                continue
            try:
                if isinstance(item, ValidationError):
                    raise item
                image, created = _row_store(row, item, categories)
            except ValidationError as exc:
                IngestRow.objects.filter(pk=row.pk).update(
                    status=RowStatus.FAILED, error=_message(exc)[:2000], updated_at=timezone.now()
                )
                totals["failed"] += 1
            else:
                totals["done"] += 1
                if created:
                    new_images.append(image.pk)
    return new_images


def _row_store(row: IngestRow, item: _RowInput, categories: dict) -> tuple[ProductImage, bool]:
    """Store one row in a savepoint: its product and image; (the image, whether it is new)."""
    known = set(categories)
    try:
        with transaction.atomic():
            product = _product_upsert(sku=item.sku, title=item.title, values=item.values, categories=categories)
            image, created = services.product_image_add(
                product=product, data=item.data, filename=item.filename, queue=False
            )
            IngestRow.objects.filter(pk=row.pk).update(
                status=RowStatus.DONE, image=image, image_new=created, error="", updated_at=timezone.now()
            )
    except ValidationError:
        for path in set(categories) - known:
            del categories[path]  # created in the savepoint just rolled back
        raise
    return image, created


def _image_bytes(image: str, archive: ArchiveReader | None) -> tuple[bytes, str]:
    if URL_SCHEME.match(image):
        try:
            fetched = fetch_url(image)
        except FetchError as exc:
            raise ValidationError({"image": str(exc)}) from None
        return fetched.data, PurePath(urlsplit(fetched.url).path).name
    if archive is None:
        raise ValidationError({"image": f"{image[:200]} is a path, but the job has no archive; upload a ZIP "
                                        "of the images with the manifest, or give http(s) URLs"})
    return archive.read(image), PurePath(image).name


def _category(path: str, categories: dict) -> Category:
    if path not in categories:
        categories[path] = services.category_get_or_create_path(path=path)
    return categories[path]


def _same_price(current: Decimal | None, given: str) -> bool:
    try:
        return current is not None and current == Decimal(given)
    except InvalidOperation:
        return False


def _product_upsert(*, sku: str, title: str, values: dict, categories: dict) -> Product:
    """The product with this sku, created from the row or updated with the row's non-empty values."""
    description, price = values.get("description", ""), values.get("price", "")
    category = _category(values["category"], categories) if values.get("category") else None
    product = Product.objects.filter(sku=sku).first()
    if product is None:
        if not title:
            raise ValidationError({"title": "the title is empty"})
        try:
            with transaction.atomic():
                return services.product_create(sku=sku, title=title, description=description, price=price,
                                               category=category)
        except IntegrityError:  # another worker created it a moment ago
            product = Product.objects.get(sku=sku)
    changes = {}
    if title and title != product.title:
        changes["title"] = title
    if description and description != product.description:
        changes["description"] = description
    if price and not _same_price(product.price, price):
        changes["price"] = price
    if category is not None and category.pk != product.category_id:
        changes["category"] = category
    return services.product_update(product=product, **changes) if changes else product


def _message(exc: ValidationError) -> str:
    if hasattr(exc, "error_dict"):
        return "; ".join(f"{name}: {message}" for name, messages in exc.message_dict.items() for message in messages)
    return "; ".join(exc.messages)


# ----- progress and the end of a job -------------------------------------------------------------

def ingest_job_refresh(*, job: IngestJob) -> IngestJob:
    """Derive a running job's counters from its rows; finish it once nothing is left to wait for.

    A row succeeded once its image is indexed; it failed if it could not be stored or its image
    could not be embedded (the image's reason becomes the row's error when the job finishes).
    """
    if job.status != JobStatus.RUNNING:
        return job
    counts = job.rows.aggregate(
        total=Count("id"),
        pending=Count("id", filter=Q(status=RowStatus.PENDING)),
        waiting=Count("id", filter=Q(status=RowStatus.DONE,
                                     image__status__in=[ImageStatus.PENDING, ImageStatus.PROCESSING])),
        image_failed=Count("id", filter=Q(status=RowStatus.DONE, image__status=ImageStatus.FAILED)),
        failed=Count("id", filter=Q(status=RowStatus.FAILED)),
        new=Count("id", filter=Q(status=RowStatus.DONE, image_new=True)),
        already=Count("id", filter=Q(status=RowStatus.DONE, image_new=False)),
    )
    failed = counts["failed"] + counts["image_failed"]
    succeeded = counts["total"] - counts["pending"] - counts["waiting"] - failed
    indexed = ProductImage.objects.filter(ingest_rows__job=job, status=ImageStatus.INDEXED).distinct().count()
    pace = ProductImage.objects.filter(ingest_rows__job=job, ingest_rows__image_new=True,
                                       status=ImageStatus.INDEXED).aggregate(first=Min("updated_at"),
                                                                             last=Max("updated_at"))
    now = timezone.now()
    progress = {"total": counts["total"], "processed": succeeded + failed, "succeeded": succeeded,
                "failed": failed, "images_indexed": indexed, "images_new": counts["new"],
                "images_already": counts["already"], "first_image_at": pace["first"],
                "last_image_at": pace["last"], "updated_at": now}
    if counts["pending"] or counts["waiting"]:
        IngestJob.objects.filter(pk=job.pk, status=JobStatus.RUNNING).update(**progress)
    else:
        with transaction.atomic():
            for row in job.rows.filter(status=RowStatus.DONE, image__status=ImageStatus.FAILED).select_related("image"):
                IngestRow.objects.filter(pk=row.pk).update(
                    status=RowStatus.FAILED, updated_at=now,
                    error=f"image: {row.image.error or 'the image could not be embedded'}"[:2000],
                )
            status = JobStatus.COMPLETED_WITH_ERRORS if failed else JobStatus.SUCCEEDED
            finished = IngestJob.objects.filter(pk=job.pk, status=JobStatus.RUNNING).update(
                status=status, finished_at=now, **progress
            )
        if finished:
            if job.archive:
                _readers.pop(_reader_key(job))
            logger.info("ingest job %s %s: %s of %s rows succeeded", job.pk, status, succeeded, counts["total"])
    job.refresh_from_db()
    return job


def ingest_job_fail(*, job_id: int, reason: str) -> None:
    """The job cannot run at all (an unusable manifest): it ends failed with the reason."""
    now = timezone.now()
    IngestJob.objects.filter(pk=job_id).exclude(status__in=IngestJob.FINISHED).update(
        status=JobStatus.FAILED, errors=[{"row": None, "sku": None, "error": reason[:2000]}],
        finished_at=now, updated_at=now,
    )


def ingest_rows_mark_failed(*, job_id: int, first: int, last: int, reason: str) -> int:
    """The last retry of a chunk failed: its rows not done end failed with the reason."""
    count = IngestRow.objects.filter(job_id=job_id, number__gte=first, number__lte=last,
                                     status=RowStatus.PENDING).update(
        status=RowStatus.FAILED, error=reason[:2000], updated_at=timezone.now()
    )
    job = IngestJob.objects.filter(pk=job_id).first()
    if job is not None:
        ingest_job_refresh(job=job)
    return count


def ingest_jobs_sweep() -> dict:
    """Refresh every running job (counters, and the end of those whose images are now indexed), and
    queue again the work of jobs that have not moved for INGEST_STALE_SECONDS (a lost message)."""
    stale_before = timezone.now() - timedelta(seconds=settings.INGEST_STALE_SECONDS)
    refreshed = requeued = 0
    for job in IngestJob.objects.filter(status=JobStatus.QUEUED, updated_at__lt=stale_before):
        IngestJob.objects.filter(pk=job.pk).update(updated_at=timezone.now())
        requeued += ingest_job_queue(job_id=job.pk)
    for job in IngestJob.objects.filter(status=JobStatus.RUNNING):
        job = ingest_job_refresh(job=job)
        refreshed += 1
        if job.status != JobStatus.RUNNING or not job.rows.filter(status=RowStatus.PENDING).exists():
            continue
        last_move = job.rows.aggregate(last=Max("updated_at"))["last"] or job.started_at
        if last_move < stale_before:
            chunks = _pending_chunks(job)
            job.rows.filter(status=RowStatus.PENDING).update(updated_at=timezone.now())
            _queue_chunks(job.pk, chunks)
            requeued += len(chunks)
    return {"refreshed": refreshed, "requeued": requeued}


# ----- reads -------------------------------------------------------------------------------------

def ingest_job_current(*, job: IngestJob, max_age_s: float = 1.0) -> IngestJob:
    """The job with counters no older than max_age_s while it runs."""
    if job.status == JobStatus.RUNNING and (timezone.now() - job.updated_at).total_seconds() > max_age_s:
        return ingest_job_refresh(job=job)
    return job


def ingest_job_errors(*, job: IngestJob, limit: int = MAX_ERRORS_SHOWN) -> list[dict]:
    """The job's own errors, then its failed rows by row number: [{"row", "sku", "error"}]."""
    rows = job.rows.filter(status=RowStatus.FAILED).order_by("number").values_list("number", "sku", "error")[:limit]
    return list(job.errors) + [{"row": number, "sku": sku, "error": error} for number, sku, error in rows]
