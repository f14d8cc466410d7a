"""Deployment checks, run by `manage.py check --deploy`."""
from django.conf import settings
from django.core.checks import Tags, Warning, register


@register(Tags.security, deploy=True)
def throttle_counters_shared(app_configs, **kwargs):
    if settings.CACHES["default"]["BACKEND"].endswith(".RedisCache"):
        return []
    return [Warning(
        "request throttling counts in each process's own memory, so every web process allows the whole rate",
        hint="set REDIS_URL (or a redis:// CELERY_BROKER_URL) so that all web processes share the counters",
        id="catalog.W001",
    )]
