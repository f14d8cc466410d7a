"""Per-client throttling of search and uploads, counted in the configured cache: Redis in production, so that
every web process sees the same count (scripts/test runs this module again on Redis, the `services` pass)."""
import os

import pytest
from django.conf import settings
from django.core.cache import caches
from rest_framework.test import APIClient
from rest_framework.throttling import ScopedRateThrottle

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]

CLIENT, OTHER_CLIENT = "203.0.113.7", "203.0.113.8"
KEYS = [f"throttle_{scope}_{address}" for scope in ("search", "uploads") for address in (CLIENT, OTHER_CLIENT)]


@pytest.fixture
def two_a_minute(monkeypatch):
    monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", {"search": "2/min", "uploads": "2/min"})
    caches["default"].delete_many(KEYS)
    yield
    caches["default"].delete_many(KEYS)


def search(address: str, **headers):
    """A search from a new client object each time, as separate requests to separate web processes arrive."""
    return APIClient(REMOTE_ADDR=address, **headers).post("/api/search/", {}, format="json")


def test_the_count_is_per_client_and_shared_through_the_cache(two_a_minute):
    assert search(CLIENT).status_code == 400  # refused as invalid, and still counted
    # A new cache connection, as another web process opens it, sees the count.
    assert len(caches.create_connection("default").get(f"throttle_search_{CLIENT}")) == 1
    assert search(CLIENT).status_code == 400
    throttled = search(CLIENT)
    assert throttled.status_code == 429
    assert "throttled" in throttled.json()["error"].lower()
    assert 0 < int(throttled["Retry-After"]) <= 60
    # Another client has its own count.
    assert search(OTHER_CLIENT).status_code == 400


def test_a_forwarded_for_header_does_not_make_a_new_client(two_a_minute):
    codes = [search(CLIENT, HTTP_X_FORWARDED_FOR=f"198.51.100.{i}").status_code for i in range(3)]
    assert codes == [400, 400, 429]


def test_uploads_are_counted_per_user(staff, staff_user, two_a_minute):
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    other = get_user_model().objects.create_user("staff2", password="staff-pass-456", is_staff=True)
    other_staff = APIClient()
    other_staff.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=other).key}")
    keys = [f"throttle_uploads_{user.pk}" for user in (staff_user, other)]
    caches["default"].delete_many(keys)
    try:
        # Throttling comes before the view: an upload to a missing product counts.
        codes = [staff.post("/api/products/999999/images/", {}).status_code for _ in range(3)]
        assert codes == [404, 404, 429]
        assert other_staff.post("/api/products/999999/images/", {}).status_code == 404
    finally:
        caches["default"].delete_many(keys)


def test_with_a_redis_broker_the_counters_live_in_redis(two_a_minute):
    redis_configured = os.environ.get("CELERY_BROKER_URL", "").startswith("redis")
    expected = "RedisCache" if redis_configured else "LocMemCache"  # embedded: one process, its own memory
    assert settings.CACHES["default"]["BACKEND"].endswith(f".{expected}")
    search(CLIENT)
    if redis_configured:
        import redis

        server = redis.Redis.from_url(settings.CACHES["default"]["LOCATION"])
        key = caches["default"].make_key(f"throttle_search_{CLIENT}")
        assert server.exists(key)
        assert 0 < server.ttl(key) <= 60  # the counter expires with the rate's window
