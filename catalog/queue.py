"""Putting work on the task queue, by the tasks' registered names; the catalog never imports the workers.

Tasks are registered by `workers` (an installed app) under explicit names, and routed to queues by
name in settings. With tasks eager (tests, `VISUALSEARCH_TASKS_EAGER`), they run in-process.
"""
import logging

from celery import current_app
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
    try:
        with current_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=2)
    except Exception as exc:  # kombu raises transport-specific errors here
        raise QueueUnavailable(type(exc).__name__) from exc


def enqueue(task_name: str, **kwargs) -> bool:
    """Queue the task registered as `task_name`; False when the broker refused it (a sweep queues the work again)."""
    try:
        current_app.tasks[task_name].apply_async(kwargs=kwargs, retry=False)
        return True
    except (BrokerError, ConnectionError, OSError) as exc:
        logger.warning("could not queue %s%s: %s; a sweep will retry", task_name, kwargs, exc)
        return False


def queue_backlog(queue: str) -> int:
    """Messages waiting in `queue` (0 with eager tasks, or when the broker cannot say)."""
    if _eager():
        return 0
    try:
        with current_app.connection_for_read() as connection:
            return connection.default_channel.queue_declare(queue=queue, passive=True).message_count
    except Exception:  # the queue does not exist yet, or the broker is down
        return 0
