"""Celery tasks: thin wrappers that pass ids to catalog services.

Every task is idempotent (running it twice leaves the same state), acknowledged late and re-queued
if its worker dies, and retried with backoff on transient errors. Routing lives in settings.
"""
from celery import Task, shared_task
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError

from catalog import categorizer, ingest, pipeline

RELIABLE = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (DatabaseError, ConnectionError, OSError, TimeoutError),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 5,
}


def _database_unreachable(exc: BaseException) -> bool:
    """The retries ran out during a database outage: the work is not at fault, and beat's sweeps queue it
    again once the database is back (in-process, no beat runs: the work ends failed with the reason)."""
    return isinstance(exc, (OperationalError, InterfaceError)) and not settings.CELERY_TASK_ALWAYS_EAGER


class EmbedTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        if _database_unreachable(exc):
            return  # the images stay pending or processing: requeue_stale_images queues them again
        # Retries are spent: the images end failed with the reason instead of waiting forever.
        image_ids = kwargs.get("image_ids") or (args[0] if args else [])
        pipeline.images_mark_failed(image_ids=image_ids, reason=f"embedding failed: {exc}")


@shared_task(bind=True, base=EmbedTask, **RELIABLE)
def embed_images(self, image_ids: list[int]) -> dict:
    """Decode and embed a batch of images in one forward pass, then queue them for indexing."""
    return pipeline.images_embed(image_ids=image_ids)


@shared_task(bind=True, **RELIABLE)
def index_images(
    self, add_ids: list[int] | None = None, remove_ids: list[int] | None = None, model: dict | None = None
) -> dict:
    """Apply embedded and deleted images to the vector index and publish a new version."""
    return pipeline.index_apply(add_ids=add_ids or [], remove_ids=remove_ids or [], model=model)


@shared_task(**RELIABLE)
def requeue_stale_images() -> dict:
    """Queue again any image left pending or processing too long (lost message, broker outage)."""
    return pipeline.images_requeue_stale()


class IngestStartTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        # Retries are spent: the job ends failed with the reason instead of staying queued.
        ingest.ingest_job_fail(job_id=kwargs["job_id"], reason=f"the job could not be started: {exc}")


class IngestRowsTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        if _database_unreachable(exc):
            return  # the rows stay pending: refresh_ingest_jobs queues a stalled job's pending rows again
        # Retries are spent: the chunk's rows not done end failed with the reason; the job goes on.
        ingest.ingest_rows_mark_failed(
            job_id=kwargs["job_id"], first=kwargs["first"], last=kwargs["last"], reason=f"ingest failed: {exc}"
        )


@shared_task(bind=True, base=IngestStartTask, **RELIABLE)
def start_ingest_job(self, job_id: int) -> dict:
    """Read an ingest job's manifest into rows and queue them in chunks."""
    return {"chunks": len(ingest.ingest_job_start(job_id=job_id))}


@shared_task(bind=True, base=IngestRowsTask, **RELIABLE)
def ingest_rows(self, job_id: int, first: int, last: int) -> dict:
    """Store the pending rows first..last of an ingest job; rows already done are skipped."""
    return ingest.ingest_rows_process(job_id=job_id, first=first, last=last)


@shared_task(**RELIABLE)
def refresh_ingest_jobs() -> dict:
    """Bring running ingest jobs' counters up to date, finish those that are done, revive stalled ones."""
    return ingest.ingest_jobs_sweep()


class TrainCategorizerTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        # Retries are spent: the version ends failed with the reason instead of training forever.
        categorizer.categorizer_fail(version_id=kwargs["version_id"], reason=f"training failed: {exc}")


@shared_task(
    bind=True, base=TrainCategorizerTask,
    # Acknowledged early: a training may outlast the broker's visibility timeout, and a redelivered copy
    # would train twice at once. A lost one ends failed (categorizer_train_start) and is started again.
    **{**RELIABLE, "acks_late": False, "reject_on_worker_lost": False},
    soft_time_limit=settings.CATEGORIZER_TRAIN_TIME_LIMIT, time_limit=settings.CATEGORIZER_TRAIN_TIME_LIMIT + 60,
)
def train_categorizer(self, version_id: int) -> dict:
    """Train the category head from stored embeddings (no model, no GPU: the default queue) and refresh suggestions."""
    return categorizer.categorizer_train(version_id=version_id)
