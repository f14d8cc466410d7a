"""manage.py train_categorizer: train the category head."""
import json

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from catalog.categorizer import categorizer_status, categorizer_train_start
from catalog.models import CategorizerVersion


class Command(BaseCommand):
    help = (
        "Train the category head from the categorized products' indexed images, on a worker (in this process "
        "when tasks run in-process), then store suggestions for the uncategorized products."
    )

    def handle(self, *args, **options):
        try:
            version = categorizer_train_start()
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        if version.status == CategorizerVersion.Status.TRAINING:
            self.stdout.write(f"training {version.pk} queued; follow it with GET /api/categorizer/ or in the admin")
            return
        if version.status == CategorizerVersion.Status.FAILED:
            raise CommandError(f"training {version.pk} failed: {version.error}")
        status = categorizer_status()
        metrics = status["metrics"]
        self.stdout.write(self.style.SUCCESS(
            f"categorizer {status['version']} ready: {status['n_train']} training images, "
            f"held-out top-1 {metrics['top1']:.3f}, top-5 {metrics['top5']:.3f}"
        ))
        self.stdout.write(json.dumps({k: status[k] for k in ("status", "version", "n_train", "n_test")}))
