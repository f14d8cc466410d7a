import os
import subprocess

import pytest
from django.db import connection

from tests.workers.live import Workers


@pytest.fixture
def services_only():
    if connection.vendor != "postgresql" or not os.environ.get("CELERY_BROKER_URL", "").startswith("redis"):
        pytest.fail("worker tests need DATABASE_URL (PostgreSQL) and CELERY_BROKER_URL (Redis): run scripts/test")


@pytest.fixture
def data_dir(settings, isolated_data, offline_model):
    settings.STALE_IMAGE_SECONDS = 3
    subprocess.run(["redis-cli", "-u", os.environ["CELERY_BROKER_URL"], "flushdb"], check=True, capture_output=True)
    return isolated_data


@pytest.fixture
def workers(data_dir):
    pool = Workers(data_dir)
    yield pool
    pool.stop_all()
