"""GET /api/health/ and the API's answer when the database fails under a request. scripts/test runs this
module on SQLite and again on PostgreSQL and Redis; tests/workers/test_faults.py stops real servers."""
import pytest
from django.db import OperationalError

from catalog import selectors
from catalog.api.errors import DATABASE_UNAVAILABLE

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]


def test_health_is_ok_while_the_database_and_the_queue_answer(anon):
    response = anon.get("/api/health/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "queue": "ok"}, "index": None}


def test_a_database_failure_under_a_request_is_a_503_with_a_readable_error(anon, monkeypatch):
    def connection_lost():
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(selectors, "category_list", connection_lost)
    response = anon.get("/api/categories/")
    assert response.status_code == 503
    assert response.json() == {"error": DATABASE_UNAVAILABLE}
    assert response["Retry-After"] == "30"
