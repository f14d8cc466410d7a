"""Putting work on the task queue. With no broker configured, tasks run in-process (Celery eager mode)."""
import logging

from django.conf import settings
from kombu.exceptions import OperationalError as BrokerError

logger = logging.getLogger(__name__)


class QueueUnavailable(Exception):
    """The broker cannot take work right now; the API answers 503 and accepts nothing."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            "the task queue is unavailable, so this work cannot be accepted now; nothing was stored; "
            "try again in a minute" + (f" ({detail})" if detail else "")
        )


def _eager() -> bool:
    return bool(settings.CELERY_TASK_ALWAYS_EAGER)


def queue_check() -> None:
    """Raise QueueUnavailable unless the broker answers now. Called before accepting queued work."""
    if _eager():
        return
    from visualsearch.celery import app

    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=2)
    except Exception as exc:  # kombu raises transport-specific errors here
        raise QueueUnavailable(type(exc).__name__) from exc


def enqueue(task, **kwargs) -> bool:
    """Queue a task; False when the broker refused it (the stale-image sweep queues the work again)."""
    try:
        task.apply_async(kwargs=kwargs, retry=False)
        return True
    except (BrokerError, ConnectionError, OSError) as exc:
        logger.warning("could not queue %s%s: %s; the stale-image sweep will retry", task.name, kwargs, exc)
        return False
