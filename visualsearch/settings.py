"""Settings for visualsearch, read from the environment in this one place.

With no environment variable set the service runs embedded: SQLite, media and index files under
VISUALSEARCH_DATA_DIR, Celery tasks executed in-process. Setting DATABASE_URL or CELERY_BROKER_URL
switches to production: DEBUG off, SECRET_KEY required, HTTPS-only cookies and redirects.
The README's table lists every variable read here.
"""
import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from exc


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


# Settings only read: the data directory and the embedded secret key are created by `manage.py prepare_data`.
DATA_DIR = Path(env_str("VISUALSEARCH_DATA_DIR", str(BASE_DIR / "data"))).resolve()
SECRET_KEY_FILE = DATA_DIR / "secret_key"

DATABASE_URL = env_str("DATABASE_URL")
BROKER_URL = env_str("CELERY_BROKER_URL")
PRODUCTION = bool(DATABASE_URL or BROKER_URL)


def _secret_key() -> str:
    key = env_str("SECRET_KEY")
    if key:
        return key
    if PRODUCTION:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set in the environment when DATABASE_URL or CELERY_BROKER_URL is set "
            "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(50))')"
        )
    # Embedded mode keeps a generated key in the data directory (prepare_data writes it) so sessions survive
    # restarts; before it exists, a process-local key serves.
    try:
        return SECRET_KEY_FILE.read_text().strip()
    except FileNotFoundError:
        return secrets.token_urlsafe(50)


SECRET_KEY = _secret_key()
DEBUG = env_bool("VISUALSEARCH_DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files served by the service itself: /api/docs/ works offline
    "catalog",
    "workers",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "catalog.middleware.RequestBodyLimitMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "visualsearch.urls"
WSGI_APPLICATION = "visualsearch.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Connections live a minute; each is checked before its first use in a request or task, so a database
# restart costs no failed request once the server is back.
DATABASES = {
    "default": dj_database_url.parse(DATABASE_URL, conn_max_age=60, conn_health_checks=True)
    if DATABASE_URL
    else {"ENGINE": "django.db.backends.sqlite3", "NAME": DATA_DIR / "db.sqlite3"}
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Waiting on the write lock beats failing with "database is locked" under concurrent requests.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 20
    # WAL: readers never wait for the writer, and a commit is an append instead of journal fsyncs
    # (NORMAL is crash-safe in WAL mode; a power cut may lose the last commits, never corrupt the file).
    DATABASES["default"]["OPTIONS"]["init_command"] = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL"
    # A transaction takes the write lock when it begins: a deferred one that read first and then writes fails
    # at once with "database is locked" when another process wrote in between (the busy timeout never
    # applies to that upgrade), which the embedded worker and `seed_demo` writing together hit.
    DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", BROKER_URL if BROKER_URL.startswith("redis") else "")
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    if REDIS_URL
    else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
MEDIA_URL = "/media/"
MEDIA_ROOT = DATA_DIR / "media"
STORAGES = {
    "default": {"BACKEND": env_str("VISUALSEARCH_STORAGE_BACKEND", "django.core.files.storage.FileSystemStorage")},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Uploaded media is served by the app itself unless a front proxy or object store serves it.
SERVE_MEDIA = env_bool("VISUALSEARCH_SERVE_MEDIA", True)
WHITENOISE_USE_FINDERS = True

# Request bodies: a file upload may be up to MAX_UPLOAD_BYTES; other bodies stay small.
MAX_UPLOAD_BYTES = env_int("VISUALSEARCH_MAX_UPLOAD_BYTES", 20 * 1024 * 1024)
MAX_REQUEST_BYTES = env_int("VISUALSEARCH_MAX_REQUEST_BYTES", 2 * MAX_UPLOAD_BYTES + 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 4 * 1024 * 1024

# Images: what uploads may be, and how the model sees them.
IMAGE_ALLOWED_FORMATS = [f.upper() for f in env_list("VISUALSEARCH_IMAGE_FORMATS", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF"])]
IMAGE_MAX_PIXELS = env_int("VISUALSEARCH_IMAGE_MAX_PIXELS", 600_000_000)  # bombs: ml/images.py ratio
INDEX_DIR = DATA_DIR / "index"
# The category head (catalog/categorizer.py): trained head files, and the evaluation reports the admin links to.
CATEGORIZER_DIR = DATA_DIR / "categorizer"
REPORTS_DIR = DATA_DIR / "reports"
# Fine-tuned checkpoints and each model's archived vectors (catalog/finetuning.py), kept until staff delete them.
MODELS_DIR = DATA_DIR / "models"
FINETUNE_TIME_LIMIT = env_int("VISUALSEARCH_FINETUNE_TIME_LIMIT", 6 * 3600)
# A training whose progress has not moved this long lost its worker: it resumes from its last epoch.
FINETUNE_STALE_SECONDS = env_int("VISUALSEARCH_FINETUNE_STALE_SECONDS", 900)
# Training reads stored embeddings only (no model, no GPU): it runs on the default queue, for up to this long.
CATEGORIZER_TRAIN_TIME_LIMIT = env_int("VISUALSEARCH_CATEGORIZER_TIME_LIMIT", 3600)

# Images fetched from user-given URLs (search by URL, ingest manifests).
FETCH_CONNECT_TIMEOUT = 3.0
FETCH_READ_TIMEOUT = 10.0
FETCH_TOTAL_TIMEOUT = env_int("VISUALSEARCH_FETCH_TIMEOUT", 30)
# Only tests turn this on, to fetch from a server on 127.0.0.1; never in a deployment.
FETCH_ALLOW_PRIVATE_ADDRESSES = False
EMBED_BACKBONE = env_str("VISUALSEARCH_BACKBONE", "resnet50")
EMBED_WEIGHTS = env_str("VISUALSEARCH_WEIGHTS", "imagenet")
EMBED_PRECISION = env_str("VISUALSEARCH_PRECISION", "auto")
# Embedded mode falls back to the offline EfficientNet-Lite0 when ResNet-50's weights are absent;
# production fails loudly instead, so a fleet never mixes backbones by accident.
EMBED_FALLBACK = env_bool("VISUALSEARCH_BACKBONE_FALLBACK", not PRODUCTION)
DEFAULT_CURRENCY = env_str("VISUALSEARCH_DEFAULT_CURRENCY", "USD")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["catalog.api.permissions.IsStaffOrReadOnly"],
    "DEFAULT_PAGINATION_CLASS": "catalog.api.pagination.PageNumberPagination",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "catalog.api.schema.AutoSchema",
    "EXCEPTION_HANDLER": "catalog.api.errors.exception_handler",
    "DEFAULT_THROTTLE_RATES": {
        "uploads": env_str("VISUALSEARCH_UPLOAD_RATE", "120/min"),
        "search": env_str("VISUALSEARCH_SEARCH_RATE", "600/min"),
    },
    # Clients are told apart by address: X-Forwarded-For is believed only from this many proxies in front of
    # the app (0: never, so a client cannot pose as a new one with each request).
    "NUM_PROXIES": env_int("VISUALSEARCH_NUM_PROXIES", 0),
}
SPECTACULAR_SETTINGS = {
    "TITLE": "visualsearch API",
    "DESCRIPTION": "Visual similarity search for product catalogs.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "ImageStatusEnum": "catalog.models.ProductImage.Status",
        "SuggestionStatusEnum": "catalog.models.CategoryPrediction.Status",
        "CategorizerStatusEnum": "catalog.models.CategorizerVersion.Status",
        "IngestJobStatusEnum": "catalog.models.IngestJob.Status",
        "ModelStatusEnum": "catalog.models.ModelVersion.Status",
    },
}

# Celery. Embedded, `./scripts/serve` runs a real background worker (VISUALSEARCH_EMBEDDED_WORKER=1) on kombu's
# filesystem transport: messages are files under DATA_DIR/broker, nothing to install. Without it (tests, a bare
# `manage.py` command) tasks run in-process (eager), as VISUALSEARCH_TASKS_EAGER=1 asks anywhere.
EMBEDDED_WORKER = not PRODUCTION and env_bool("VISUALSEARCH_EMBEDDED_WORKER", False)
BROKER_DIR = DATA_DIR / "broker"
CELERY_BROKER_URL = BROKER_URL or ("filesystem://" if EMBEDDED_WORKER else "memory://localhost/")
CELERY_TASK_ALWAYS_EAGER = (not PRODUCTION and not EMBEDDED_WORKER) or env_bool("VISUALSEARCH_TASKS_EAGER", False)
CELERY_TASK_EAGER_PROPAGATES = False
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
# embed: model inference (GPU workers in production); index: the single writer of the vector index;
# default: I/O and bookkeeping. README: one worker command per queue.
# Tasks are routed by their registered names (workers/tasks.py). `compact` runs beside `index` (README).
CELERY_TASK_ROUTES = {
    "embed_images": {"queue": "embed"},
    "index_images": {"queue": "index"},
    "compact_index": {"queue": "compact"},
    "finetune_model": {"queue": "train"},
    "evaluate_model": {"queue": "train"},
}
CELERY_BEAT_SCHEDULE = {
    "requeue-stale-images": {
        "task": "requeue_stale_images",
        "schedule": float(env_int("VISUALSEARCH_SWEEP_SECONDS", 30)),
    },
    "resume-lost-trainings": {
        "task": "resume_lost_trainings",
        "schedule": float(env_int("VISUALSEARCH_SWEEP_SECONDS", 30)),
    },
    "refresh-ingest-jobs": {
        "task": "refresh_ingest_jobs",
        "schedule": float(env_int("VISUALSEARCH_INGEST_SWEEP_SECONDS", 2)),
    },
}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# A decoder or model that hangs is stopped; the task is retried, then its images end failed.
CELERY_TASK_SOFT_TIME_LIMIT = env_int("VISUALSEARCH_TASK_SOFT_TIME_LIMIT", 600)
CELERY_TASK_TIME_LIMIT = CELERY_TASK_SOFT_TIME_LIMIT + 60
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# The API answers 503 quickly when the broker is down instead of hanging on publish retries.
# A task whose worker died unacknowledged is redelivered after the visibility timeout.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5,
    "visibility_timeout": env_int("VISUALSEARCH_VISIBILITY_TIMEOUT", 600),
}
if EMBEDDED_WORKER:  # one folder both ways: the web app and the worker put and take messages there
    CELERY_BROKER_TRANSPORT_OPTIONS.update({
        "data_folder_in": str(BROKER_DIR / "messages"), "data_folder_out": str(BROKER_DIR / "messages"),
        "processed_folder": str(BROKER_DIR / "processed"), "store_processed": False,
        "control_folder": str(BROKER_DIR / "control"), "polling_interval": 0.1,
    })
# Images left pending or processing this long are queued again (a lost message, a broker outage).
STALE_IMAGE_SECONDS = env_int("VISUALSEARCH_STALE_IMAGE_SECONDS", 120)
EMBED_BATCH_SIZE = env_int("VISUALSEARCH_EMBED_BATCH", 32)
# Concurrent searches in one web process embedded together: a batch gathers for this long and holds at most
# this many images. "auto" (None): batched on CUDA, not on the CPU, where it measured no faster
# (benchmarks/load_test.py measures both ways); 0: never.
QUERY_BATCH_WAIT_MS = None if env_str("VISUALSEARCH_QUERY_BATCH_WAIT_MS", "auto") == "auto" else \
    env_int("VISUALSEARCH_QUERY_BATCH_WAIT_MS", 0)
QUERY_BATCH_IMAGES = env_int("VISUALSEARCH_QUERY_BATCH_IMAGES", 8)
INDEX_EXACT_THRESHOLD = env_int("VISUALSEARCH_INDEX_EXACT_THRESHOLD", 50_000)
# Images of two products at least this similar (cosine) are recorded as near-duplicates (catalog/duplicates.py).
DUPLICATE_SCORE = float(env_str("VISUALSEARCH_DUPLICATE_SCORE", "0.78"))  # docs/decisions.md
# Below that score, a pair whose perceptual hashes (ml/fingerprint.py) are at most this many bits apart is a
# near-duplicate too, from this score up: a much smaller copy drifts in the embedding but not in the hash.
DUPLICATE_HASH_SCORE = float(env_str("VISUALSEARCH_DUPLICATE_HASH_SCORE", "0.65"))
DUPLICATE_HASH_BITS = env_int("VISUALSEARCH_DUPLICATE_HASH_BITS", 10)

# Bulk ingest jobs (catalog/ingest.py): caps on what an upload may hold, and how the work is split.
INGEST_MAX_MANIFEST_BYTES = env_int("VISUALSEARCH_INGEST_MAX_MANIFEST_BYTES", 100 * 1024 * 1024)
INGEST_MAX_ARCHIVE_BYTES = env_int("VISUALSEARCH_INGEST_MAX_ARCHIVE_BYTES", 2 * 1024 ** 3)  # uncompressed
INGEST_MAX_FILES = env_int("VISUALSEARCH_INGEST_MAX_FILES", 100_000)
# A member expanding more than this many times is refused as a zip bomb (photos barely compress).
INGEST_MAX_COMPRESSION_RATIO = env_int("VISUALSEARCH_INGEST_MAX_COMPRESSION_RATIO", 100)
INGEST_CHUNK_ROWS = env_int("VISUALSEARCH_INGEST_CHUNK_ROWS", 50)
# A running job whose rows have not moved for this long has its pending rows queued again (a lost message).
INGEST_STALE_SECONDS = env_int("VISUALSEARCH_INGEST_STALE_SECONDS", 900)
# The ingest endpoint takes bodies up to an archive and a manifest; other bodies keep MAX_REQUEST_BYTES.
MAX_REQUEST_BYTES_BY_PATH = {
    "/api/ingest-jobs/": INGEST_MAX_ARCHIVE_BYTES + INGEST_MAX_MANIFEST_BYTES + 1024 * 1024,
}

if PRODUCTION:
    SECURE_SSL_REDIRECT = env_bool("VISUALSEARCH_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("VISUALSEARCH_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("VISUALSEARCH_LOG_LEVEL", "INFO")},
}
