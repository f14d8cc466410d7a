"""Schemathesis against the served OpenAPI schema, in-process: every operation, as an anonymous client and
as staff, with generated valid and invalid input. No answer may be a 5xx, and every answer (status, content
type, headers, body) must be one the schema documents. Seeded and bounded, so a run is reproducible. It runs in
both passes of scripts/test: SQLite, then PostgreSQL, which refuses some input SQLite stores (NUL characters)."""
import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from catalog import services

pytestmark = [pytest.mark.django_db(transaction=True, reset_sequences=True), pytest.mark.services]

CONFIG = SchemathesisConfig.from_dict({
    "seed": 20240601,
    "generation": {"max-examples": 15, "deterministic": True, "database": "none"},
})
schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application(), config=CONFIG)

# Schema-valid input that the service refuses on meaning (wrong credentials, a duplicate sku, bytes that do
# not decode, "exactly one of image, image_url, product") is a correct 400, which this check calls a failure.
EXCLUDED_CHECKS = [positive_data_acceptance]


@pytest.fixture(autouse=True)
def catalog(offline_model, photo, monkeypatch, staff_user):
    """A small catalog with ids 1 and 2, so generated ids hit real objects as well as missing ones."""
    from rest_framework.authtoken.models import Token

    from catalog import remote

    def no_network(host, port):
        raise remote.FetchError(f"the host {host!r} cannot be resolved")

    # Generated image URLs must not reach the network; tests/catalog/test_search_api.py fetches for real.
    monkeypatch.setattr(remote, "_resolve", no_network)
    food = services.category_create(name="Food")
    services.category_create(name="Fruit", parent=food)
    mug = services.product_create(sku="MUG-1", title="Mug", price=5, category=food)
    services.product_create(sku="CAT-1", title="Cat poster")
    # Not queued: embedding it would cost seconds per operation, and search is tested in test_search_api.py.
    services.product_image_add(product=mug, data=photo("coffee", size=(64, 64)), filename="mug.jpg", queue=False)
    Token.objects.create(user=staff_user)


@schema.parametrize()
def test_anonymous_client(case):
    case.call_and_validate(excluded_checks=EXCLUDED_CHECKS)


@schema.parametrize()
def test_staff_client(case):
    from rest_framework.authtoken.models import Token

    token = Token.objects.get(user__username="staff")
    response = case.call_and_validate(headers={"Authorization": f"Token {token.key}"}, excluded_checks=EXCLUDED_CHECKS)
    assert response.status_code != 401, "the staff token was not sent"
