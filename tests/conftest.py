"""Fixtures shared by every test package."""
import io
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus" / "images"


def photo_bytes(name: str = "chelsea", fmt: str = "JPEG", size: tuple[int, int] | None = None) -> bytes:
    """A real photo from scikit-image's bundled data, encoded as `fmt`."""
    from catalog.demo import skimage_photo  # here: conftest is imported before Django is set up

    img = skimage_photo(name)
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session", autouse=True)
def _data_directory():
    """The data directory's folders, as `./scripts/serve` prepares them (settings only read)."""
    from django.core.management import call_command

    call_command("prepare_data", stdout=io.StringIO())


@pytest.fixture
def photo():
    return photo_bytes


@pytest.fixture
def offline_model(settings):
    """Tests embed with the offline EfficientNet-Lite0 and its real ImageNet weights (fast on 2 cores)."""
    settings.EMBED_BACKBONE = "efficientnet_lite0"
    settings.EMBED_WEIGHTS = "imagenet"


@pytest.fixture
def isolated_data(settings, tmp_path):
    """Media and index files in a per-test directory, never in the developer's data directory."""
    from catalog import process_cache

    settings.MEDIA_ROOT = tmp_path / "media"
    settings.INDEX_DIR = tmp_path / "index"
    settings.CATEGORIZER_DIR = tmp_path / "categorizer"
    settings.REPORTS_DIR = tmp_path / "reports"
    settings.MODELS_DIR = tmp_path / "models"  # fine-tuned checkpoints and their training states
    process_cache.clear_all()
    yield tmp_path
    process_cache.clear_all()


@pytest.fixture
def anon():
    from rest_framework.test import APIClient

    return APIClient()


@pytest.fixture
def staff_user(db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("staff", password="staff-pass-123", is_staff=True)


@pytest.fixture
def staff(staff_user):
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=staff_user).key}")
    return client


@pytest.fixture
def shopper(db):
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    user = get_user_model().objects.create_user("shopper", password="shopper-pass-123")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client
