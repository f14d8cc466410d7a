"""manage.py prepare_data: the data directory and the embedded secret key."""
import secrets

from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Create the data directory and its folders, and (embedded mode) the secret key kept there, if they "
        "are missing. ./scripts/serve runs it first; settings only read what it writes."
    )

    def handle(self, *args, **options):
        for directory in (settings.DATA_DIR, settings.STATIC_ROOT, settings.MEDIA_ROOT, settings.INDEX_DIR):
            directory.mkdir(parents=True, exist_ok=True)
        if settings.EMBEDDED_WORKER:  # the embedded worker's message folders (kombu's filesystem transport)
            for name in ("messages", "processed", "control"):
                (settings.BROKER_DIR / name).mkdir(parents=True, exist_ok=True)
        if not settings.PRODUCTION and not settings.SECRET_KEY_FILE.exists():
            settings.SECRET_KEY_FILE.write_text(secrets.token_urlsafe(50))
            settings.SECRET_KEY_FILE.chmod(0o600)
            self.stdout.write(f"secret key written to {settings.SECRET_KEY_FILE}")
        self.stdout.write(f"data directory: {settings.DATA_DIR}")
