"""Settings as an operator meets them: the embedded default and production."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCTION = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test",
    "CELERY_BROKER_URL": "redis://127.0.0.1:6379/15",
    "SECRET_KEY": "a-long-random-production-secret-key-0123456789-abcdefghijklmnop",
    "ALLOWED_HOSTS": "search.example.com",
}


def manage(*args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "SECRET_KEY", "VISUALSEARCH_SSL_REDIRECT", "REDIS_URL"}}
    base["VISUALSEARCH_DATA_DIR"] = str(tmp_path / "data")
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env={**base, **env},
        capture_output=True, text=True, timeout=120,
    )


def test_embedded_default_needs_no_environment_and_reading_settings_writes_nothing(tmp_path):
    result = manage("check", env={}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "data").exists()


def test_prepare_data_creates_the_data_directory_and_a_secret_key_that_later_processes_read(tmp_path):
    assert manage("prepare_data", env={}, tmp_path=tmp_path).returncode == 0
    key_file = tmp_path / "data" / "secret_key"
    key = key_file.read_text()
    assert len(key) > 40 and oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert manage("prepare_data", env={}, tmp_path=tmp_path).returncode == 0
    assert key_file.read_text() == key  # kept, so sessions survive restarts
    shown = manage("shell", "-c", "from django.conf import settings; print(settings.SECRET_KEY)", env={},
                   tmp_path=tmp_path)
    assert shown.stdout.strip().splitlines()[-1] == key


def test_production_refuses_to_start_without_secret_key(tmp_path):
    result = manage("check", env={"DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test"}, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def test_production_passes_check_deploy(tmp_path):
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION, tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    ("change", "warning"),
    [
        ({"VISUALSEARCH_HSTS_SECONDS": "0"}, "security.W004"),
        # Without Redis each web process would count its own throttling: every one allows the whole rate.
        ({"CELERY_BROKER_URL": "", "REDIS_URL": ""}, "catalog.W001"),
    ],
)
def test_check_deploy_fails_on_a_warning(tmp_path, change, warning):
    result = manage("check", "--deploy", "--fail-level", "WARNING", env={**PRODUCTION, **change}, tmp_path=tmp_path)
    assert result.returncode != 0
    assert warning in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("change", "location"),
    [({}, "redis://127.0.0.1:6379/15"), ({"REDIS_URL": "redis://cache:6379/2"}, "redis://cache:6379/2")],
)
def test_production_counts_throttling_in_redis(tmp_path, change, location):
    code = "from django.conf import settings as s; c = s.CACHES['default']; print(c['BACKEND'], c['LOCATION'])"
    result = manage("shell", "-c", code, env={**PRODUCTION, **change}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["django.core.cache.backends.redis.RedisCache", location]
