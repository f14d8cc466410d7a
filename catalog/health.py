"""Whether the service's dependencies answer now, and what the index serves: GET /api/health/."""
import logging

from django.db import DatabaseError, connection

from catalog.queue import QueueUnavailable, queue_check
from catalog.search import SearchUnavailable, index_reader
from ml.index_terms import IndexFileError

logger = logging.getLogger(__name__)

OK = "ok"
UNAVAILABLE = "unavailable"


def dependencies_check() -> dict[str, str]:
    """{"database": "ok" or "unavailable", "queue": the same}; the reasons go to the log, not to clients."""
    checks = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = OK
    except DatabaseError as exc:
        logger.warning("health: the database is unavailable: %s", str(exc).strip())
        checks["database"] = UNAVAILABLE
    try:
        queue_check()
        checks["queue"] = OK
    except QueueUnavailable as exc:
        logger.warning("health: %s", exc)
        checks["queue"] = UNAVAILABLE
    return checks


def index_details() -> dict | None:
    """The served index as this process searches it: kind, size, recall and why it is searched so (None: none)."""
    try:
        return index_reader().current().describe()
    except (SearchUnavailable, IndexFileError):
        return None
