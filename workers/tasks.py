"""Celery tasks: thin wrappers that pass ids to catalog services, each registered under an explicit name.

Every task is idempotent (running it twice leaves the same state), acknowledged late and re-queued
if its worker dies, and retried with backoff on transient errors. The catalog queues them by name
(catalog/queue.py); settings route the names to queues. A task whose retries are spent hands its
work to one failure hook (`when_retries_spent`), which records why.
"""
from collections.abc import Callable

from celery import shared_task
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError

from catalog import categorizer, evaluation, finetuning, indexing, ingest, pipeline, precision_choice

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


def when_retries_spent(record: Callable[..., object], *, unless_database_down: bool = False):
    """A task's `on_failure`: its retries are spent, so `record(exc, **the task's kwargs)` says why on its work.

    With `unless_database_down` a database outage records nothing: the work stays where it is and a sweep
    queues it again.
    """

    def on_failure(task, exc, task_id, args, kwargs, einfo) -> None:
        if unless_database_down and _database_unreachable(exc):
            return
        record(exc, **kwargs)

    return on_failure


def _embedding_failed(exc, *, image_ids: list[int]) -> None:
    pipeline.images_mark_failed(image_ids=image_ids, reason=f"embedding failed: {exc}")


def _ingest_start_failed(exc, *, job_id: int) -> None:
    ingest.ingest_job_fail(job_id=job_id, reason=f"the job could not be started: {exc}")


def _ingest_rows_failed(exc, *, job_id: int, first: int, last: int) -> None:
    # The chunk's rows not done end failed with the reason; the job goes on.
    ingest.ingest_rows_mark_failed(job_id=job_id, first=first, last=last, reason=f"ingest failed: {exc}")


def _finetune_failed(exc, *, version_id: int) -> None:
    finetuning.finetune_fail(version_id=version_id, reason=f"fine-tuning failed: {exc}")


def _training_failed(exc, *, version_id: int) -> None:
    categorizer.categorizer_fail(version_id=version_id, reason=f"training failed: {exc}")


@shared_task(name="embed_images", on_failure=when_retries_spent(_embedding_failed, unless_database_down=True),
             **RELIABLE)
def embed_images(image_ids: list[int]) -> dict:
    """Decode and embed a batch of images in one forward pass, then queue them for indexing."""
    return pipeline.images_embed(image_ids=image_ids)


@shared_task(name="index_images", **RELIABLE)
def index_images(add_ids: list[int] | None = None, remove_ids: list[int] | None = None,
                 model: dict | None = None) -> dict:
    """Apply embedded and deleted images to the vector index: one delta segment per model."""
    return indexing.index_apply(add_ids=add_ids or [], remove_ids=remove_ids or [], model=model)


@shared_task(name="compact_index", **RELIABLE)
def compact_index(identity: str) -> dict:
    """Fold a model's index overlay into a new base, while updates and searches go on."""
    return indexing.index_compact(identity=identity)


@shared_task(name="requeue_stale_images", **RELIABLE)
def requeue_stale_images() -> dict:
    """Queue again any image left pending or processing too long (lost message, broker outage)."""
    return pipeline.images_requeue_stale()


@shared_task(name="start_ingest_job", on_failure=when_retries_spent(_ingest_start_failed), **RELIABLE)
def start_ingest_job(job_id: int) -> dict:
    """Read an ingest job's manifest into rows and queue them in chunks."""
    return {"chunks": len(ingest.ingest_job_start(job_id=job_id))}


@shared_task(name="ingest_rows", on_failure=when_retries_spent(_ingest_rows_failed, unless_database_down=True),
             **RELIABLE)
def ingest_rows(job_id: int, first: int, last: int) -> dict:
    """Store the pending rows first..last of an ingest job; rows already done are skipped."""
    return ingest.ingest_rows_process(job_id=job_id, first=first, last=last)


@shared_task(name="refresh_ingest_jobs", **RELIABLE)
def refresh_ingest_jobs() -> dict:
    """Bring running ingest jobs' counters up to date, finish those that are done, revive stalled ones."""
    return ingest.ingest_jobs_sweep()


@shared_task(
    name="train_categorizer", on_failure=when_retries_spent(_training_failed),
    # Acknowledged early: a training may outlast the broker's visibility timeout, and a redelivered copy
    # would train twice at once. A lost one ends failed (categorizer_train_start) and is started again.
    **{**RELIABLE, "acks_late": False, "reject_on_worker_lost": False},
    soft_time_limit=settings.CATEGORIZER_TRAIN_TIME_LIMIT, time_limit=settings.CATEGORIZER_TRAIN_TIME_LIMIT + 60,
)
def train_categorizer(version_id: int) -> dict:
    """Train the category head from stored embeddings (no model, no GPU: the default queue) and refresh suggestions."""
    return categorizer.categorizer_train(version_id=version_id)


@shared_task(
    name="finetune_model", on_failure=when_retries_spent(_finetune_failed),
    # Acknowledged early, as a categorizer training: a redelivered copy would train twice at once. A worker
    # that dies leaves the model's progress still; resume_lost_trainings queues it again to resume.
    **{**RELIABLE, "acks_late": False, "reject_on_worker_lost": False, "autoretry_for": ()},
    soft_time_limit=settings.FINETUNE_TIME_LIMIT, time_limit=settings.FINETUNE_TIME_LIMIT + 60,
)
def finetune_model(version_id: int) -> dict:
    """Fine-tune, shadow-embed, evaluate and promote or reject one model (the `train` queue: GPU workers)."""
    return finetuning.finetune_run(version_id=version_id)


@shared_task(name="evaluate_model", **RELIABLE)
def evaluate_model(version_id: int) -> dict:
    """Evaluate one model on the catalog's own images and write its report; then choose its precision here."""
    metrics = evaluation.evaluation_run(version_id=version_id)
    if "error" not in metrics:
        precision_choice.precision_choose(version_id=version_id)
    return metrics


@shared_task(name="resume_lost_trainings", **RELIABLE)
def resume_lost_trainings() -> dict:
    """Queue again the fine-tunings whose worker died, to resume where they stopped."""
    return finetuning.trainings_resume_lost()
