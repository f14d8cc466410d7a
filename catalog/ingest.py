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
import codecs
import csv
import io
import json
import logging
import posixpath
import re
import stat
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from pathlib import PurePath
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files import File
from django.core.files.base import ContentFile
from django.db import IntegrityError, transaction
from django.db.models import Count, Max, Q
from django.utils import timezone

from catalog import services
from catalog.models import Category, IngestJob, IngestRow, Product, ProductImage
from catalog.pipeline import images_queue_embedding
from catalog.queue import enqueue, queue_check
from catalog.remote import FetchError, fetch_url

logger = logging.getLogger(__name__)

COLUMNS = ("sku", "title", "image", "category", "price", "description")
REQUIRED_COLUMNS = ("sku", "title", "image")
MAX_SKU = Product._meta.get_field("sku").max_length
MAX_TITLE = Product._meta.get_field("title").max_length
# Members this small cannot be a bomb whatever their ratio (a README, an empty file).
BOMB_MIN_BYTES = 1024 * 1024
MAX_ERRORS_SHOWN = 1000
# A batch of rows holds at most this many image bytes in memory before it is stored.
BATCH_BYTES = 64 * 1024 * 1024
URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# What people upload as a manifest by mistake, by the file's first bytes.
NOT_TEXT = (
    (b"PK\x03\x04", "a ZIP file (an Excel .xlsx workbook is one; a ZIP of images goes in `archive`)"),
    (b"\xd0\xcf\x11\xe0", "an Excel 97-2003 workbook (.xls)"),
    (codecs.BOM_UTF16_LE, "UTF-16 text (Excel's \"Unicode Text\")"),
    (codecs.BOM_UTF16_BE, "UTF-16 text"),
)

JobStatus = IngestJob.Status
RowStatus = IngestRow.Status
ImageStatus = ProductImage.Status


# ----- the manifest ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestRow:
    number: int  # the row's line in the file: the CSV header is line 1
    fields: dict[str, str]
    error: str = ""


@dataclass(frozen=True)
class Manifest:
    format: str
    rows: list[ManifestRow] = field(default_factory=list)


def manifest_format(*, filename: str, data: bytes) -> str:
    """"jsonl" for .jsonl/.ndjson/.json files or content starting with "{", else "csv"."""
    suffix = PurePath(filename or "").suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "jsonl" if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{" else "csv"


def manifest_parse(*, data: bytes, format: str) -> Manifest:
    """Every row of a manifest. ValidationError when the file as a whole cannot be used.

    A row that cannot be read (a JSON line that is not an object) comes back with its error set;
    the row's values are checked when it is processed.
    """
    text = _decode(data)
    rows = _parse_csv(text) if format == "csv" else _parse_jsonl(text)
    if not rows:
        after = " after its header" if format == "csv" else ""
        raise ValidationError({"manifest": f"the manifest has no rows{after}"})
    return Manifest(format=format, rows=rows)


def _decode(data: bytes) -> str:
    save_as = 'save it as UTF-8 (in Excel: "CSV UTF-8") and upload it again'
    for signature, what in NOT_TEXT:
        if data.startswith(signature):
            raise ValidationError({"manifest": f"the manifest is {what}, not CSV or JSON Lines text; {save_as}"})
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValidationError({
            "manifest": f"the manifest is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} is not valid "
                        f"UTF-8; {save_as}"
        }) from None
    if "\x00" in text:  # UTF-16 without a byte-order mark, or a binary file; no database stores it as text
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise ValidationError({
            "manifest": f"the manifest is not UTF-8 text: line {line} holds a NUL character (UTF-16 text or a "
                        f"binary file has them); {save_as}"
        })
    return text


def _check_columns(names: list[str], what: str) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        has = ", ".join(n for n in names if n)[:300] or "nothing"
        raise ValidationError({
            "manifest": f"the manifest's {what} has no {', '.join(missing)} "
                        f"{'column' if len(missing) == 1 else 'columns'} (it has: {has}); the columns are "
                        f"{','.join(COLUMNS)}, of which {','.join(REQUIRED_COLUMNS)} are required"
        })


def _parse_csv(text: str) -> list[ManifestRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[ManifestRow] = []
    try:
        header = next(reader, None)
        if header is None:
            raise ValidationError({"manifest": "the manifest is empty; its first line must be the header "
                                               f"{','.join(COLUMNS)}"})
        names = [name.strip().lower() for name in header]
        _check_columns(names, "header")
        position = {name: names.index(name) for name in COLUMNS if name in names}
        line = reader.line_num
        for values in reader:
            number, line = line + 1, reader.line_num
            if not any(value.strip() for value in values):
                continue  # a blank line
            fields = {name: values[i].strip() if i < len(values) else "" for name, i in position.items()}
            rows.append(ManifestRow(number=number, fields=fields))
    except csv.Error as exc:
        raise ValidationError({"manifest": f"the manifest is not valid CSV (line {reader.line_num}: {exc})"}) from None
    return rows


def _json_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("holds a NUL character")
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{json.dumps(value)[:60]} is not text or a number")


def _parse_jsonl(text: str) -> list[ManifestRow]:
    rows: list[ManifestRow] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, RecursionError):
                reason = "JSON nested too deeply to read"
            elif isinstance(exc, json.JSONDecodeError):
                reason = f"not valid JSON ({exc.msg}, column {exc.colno})"
            else:
                reason = str(exc)
            if not rows:
                raise ValidationError({"manifest": f"the manifest's first line is {reason}; each line must be a "
                                                   'JSON object such as {"sku": "A-1", "title": "...", '
                                                   '"image": "a.jpg"}'})
            rows.append(ManifestRow(number=number, fields={}, error=f"the line is {reason}"))
            continue
        obj = {str(key).strip().lower(): value for key, value in obj.items()}
        if not rows:
            _check_columns(list(obj), "first line")
        fields, errors = {}, []
        for name in COLUMNS:
            try:
                fields[name] = _json_value(obj.get(name))
            except ValueError as exc:
                errors.append(f"{name}: {exc}")
        rows.append(ManifestRow(number=number, fields=fields, error="; ".join(errors)))
    return rows


# ----- the archive -------------------------------------------------------------------------------

def _member_path(name: str) -> str | None:
    """The member's path with "/" separators, or None if it is absolute or escapes the archive."""
    name = name.replace("\\", "/")
    if not name or "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return None
    if ".." in name.split("/"):
        return None
    return posixpath.normpath(name)


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _is_bomb(info: zipfile.ZipInfo) -> bool:
    if info.file_size <= BOMB_MIN_BYTES:
        return False
    return info.file_size > max(info.compress_size, 1) * settings.INGEST_MAX_COMPRESSION_RATIO


def archive_check(file) -> None:
    """ValidationError unless `file` is a ZIP this service will read: no member with an absolute path or
    one that escapes the archive, no symbolic link, at most INGEST_MAX_FILES files and
    INGEST_MAX_ARCHIVE_BYTES uncompressed, no member expanding over INGEST_MAX_COMPRESSION_RATIO times.

    Only the central directory is read here; members are read later with a size cap of their own.
    """
    try:
        with zipfile.ZipFile(file) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise ValidationError({"archive": f"the archive is not a readable ZIP file ({exc})"}) from None
    files = [info for info in members if not info.is_dir()]
    if len(files) > settings.INGEST_MAX_FILES:
        raise ValidationError({"archive": f"the archive holds {len(files)} files, over the limit of "
                                          f"{settings.INGEST_MAX_FILES}; split it into several jobs"})
    total = sum(info.file_size for info in files)
    if total > settings.INGEST_MAX_ARCHIVE_BYTES:
        raise ValidationError({"archive": f"the archive expands to {total / 1e6:.1f} MB, over the limit of "
                                          f"{settings.INGEST_MAX_ARCHIVE_BYTES / 1e6:.1f} MB; split it into "
                                          "several jobs"})
    for info in members:
        shown = info.filename[:200]
        if _member_path(info.filename) is None:
            raise ValidationError({"archive": f"the archive holds {shown!r}, a path outside the archive; "
                                              "nothing was imported"})
        if _is_symlink(info):
            raise ValidationError({"archive": f"the archive holds {shown!r}, a symbolic link; links are not "
                                              "followed, so nothing was imported"})
        if _is_bomb(info):
            raise ValidationError({"archive": f"{shown!r} in the archive expands "
                                              f"{info.file_size / max(info.compress_size, 1):.0f} times, over the "
                                              f"{settings.INGEST_MAX_COMPRESSION_RATIO}:1 limit (the mark of a zip "
                                              "bomb); nothing was imported"})


class ArchiveReader:
    """Reads images out of a stored ZIP by the paths a manifest gives, never trusting its headers."""

    def __init__(self, file):
        self._file = file
        self._zip = zipfile.ZipFile(file)
        self._members: dict[str, zipfile.ZipInfo] = {}
        for info in self._zip.infolist():
            path = _member_path(info.filename)
            if path is not None and not info.is_dir() and not _is_symlink(info):
                self._members[path] = info
        # An archive of a folder: "images/a.jpg" also finds "catalog/images/a.jpg".
        tops = {path.split("/", 1)[0] for path in self._members}
        self._prefix = f"{tops.pop()}/" if len(tops) == 1 and all("/" in p for p in self._members) else ""

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def read(self, path: str) -> bytes:
        name = _member_path(path.strip())
        if name is None:
            raise ValidationError({"image": f"{path[:200]!r} is not a path inside the archive"})
        info = self._members.get(name) or self._members.get(self._prefix + name)
        if info is None:
            raise ValidationError({"image": f"{path[:200]} is not in the archive"})
        cap = settings.MAX_UPLOAD_BYTES
        too_large = {"image": f"{path[:200]} is over the {cap / 1e6:.1f} MB limit for an image"}
        if info.flag_bits & 0x1:
            raise ValidationError({"image": f"{path[:200]} is encrypted in the archive; archives with a "
                                            "password cannot be read"})
        if info.file_size > cap:
            raise ValidationError(too_large)
        if _is_bomb(info):
            raise ValidationError({"image": f"{path[:200]} expands over the {settings.INGEST_MAX_COMPRESSION_RATIO}:1 "
                                            "limit (the mark of a zip bomb)"})
        try:
            with self._zip.open(info) as member:
                data = member.read(cap + 1)  # the header's size is a claim; this bound is not
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
            raise ValidationError({"image": f"{path[:200]} cannot be read from the archive ({exc})"}) from None
        if len(data) > cap:
            raise ValidationError(too_large)
        return data


# One open archive per job per process: a worker takes the chunks of one job in a row, and reading a
# large ZIP's directory once per chunk would cost more than the chunk.
_readers: dict[tuple[int, str, str], ArchiveReader] = {}
_readers_lock = threading.Lock()


def _archive_reader(job: IngestJob) -> ArchiveReader | None:
    if not job.archive:
        return None
    key = _reader_key(job)
    with _readers_lock:
        reader = _readers.get(key)
        if reader is None:
            while len(_readers) >= 2:
                _readers.pop(next(iter(_readers))).close()
            reader = _readers[key] = ArchiveReader(job.archive.storage.open(job.archive.name, "rb"))
        return reader


def _reader_key(job: IngestJob) -> tuple[int, str, str]:
    return job.pk, job.archive.name, job.created_at.isoformat()


def _archive_release(job: IngestJob) -> None:
    with _readers_lock:
        reader = _readers.pop(_reader_key(job), None)
    if reader is not None:
        reader.close()


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
        job = IngestJob.objects.create(manifest_format=fmt, created_by=created_by)
        job.manifest.save(f"manifest.{fmt}", ContentFile(data), save=False)
        if archive is not None:
            job.archive.save("images.zip", archive, save=False)
        job.save(update_fields=["manifest", "archive"])
        if start:
            transaction.on_commit(lambda: ingest_job_queue(job_id=job.pk))
    job.refresh_from_db()
    return job


def ingest_job_queue(*, job_id: int) -> bool:
    from workers.tasks import start_ingest_job

    return enqueue(start_ingest_job, job_id=job_id)


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
    from workers.tasks import ingest_rows

    for first, last in chunks:
        enqueue(ingest_rows, job_id=job_id, first=first, last=last)


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
                status=RowStatus.DONE, image=image, error="", updated_at=timezone.now()
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
    )
    failed = counts["failed"] + counts["image_failed"]
    succeeded = counts["total"] - counts["pending"] - counts["waiting"] - failed
    indexed = ProductImage.objects.filter(ingest_rows__job=job, status=ImageStatus.INDEXED).distinct().count()
    now = timezone.now()
    progress = {"total": counts["total"], "processed": succeeded + failed, "succeeded": succeeded,
                "failed": failed, "images_indexed": indexed, "updated_at": now}
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
                _archive_release(job)
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


# ----- the row report ----------------------------------------------------------------------------

REPORT_COLUMNS = ("line", "status", "error", *COLUMNS)
# A cell starting with one of these is run as a formula by spreadsheets (OWASP, "CSV Injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(value: str) -> str:
    """`value` as a spreadsheet shows it as text: a leading quote before anything that would start a formula."""
    return f"'{value}" if value.startswith(FORMULA_PREFIXES) else value


class _Echo:
    def write(self, value: str) -> str:
        return value


def _row_outcome(row: IngestRow) -> tuple[str, str]:
    if row.status == RowStatus.FAILED:
        return "failed", row.error
    if row.status == RowStatus.DONE:
        if row.image is not None and row.image.status == ImageStatus.FAILED:
            return "failed", f"image: {row.image.error or 'the image could not be embedded'}"
        if row.image is None or row.image.status == ImageStatus.INDEXED:
            return "succeeded", ""
    return "pending", ""


def ingest_job_report(*, job: IngestJob) -> Iterator[str]:
    """The job's rows as CSV text, a line at a time: each row's line in the manifest, its outcome and error,
    then the manifest's own columns, so a catalog team can fix the failed rows in a spreadsheet and upload
    them again (the manifest ignores the extra columns). UTF-8 with a byte-order mark, as Excel expects.

    Every value came from someone's upload, so every cell that would start a formula starts with a quote.
    """
    writer = csv.writer(_Echo())
    yield "\ufeff" + writer.writerow(REPORT_COLUMNS)
    for error in job.errors:
        yield writer.writerow(["", "failed", spreadsheet_cell(error.get("error") or ""),
                               *("" for _ in COLUMNS)])
    for row in job.rows.select_related("image").order_by("number").iterator(chunk_size=2000):
        status, error = _row_outcome(row)
        values = [str(row.data.get(name, "")) for name in COLUMNS]
        yield writer.writerow([row.number, status, *(spreadsheet_cell(value) for value in [error, *values])])
