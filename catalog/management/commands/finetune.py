"""manage.py finetune: fine-tune the serving model on the catalog, then promote or reject it."""
import time

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from catalog.finetuning import finetune_start
from catalog.management.progress import ProgressBar
from catalog.models import ModelVersion


class Command(BaseCommand):
    help = (
        "Fine-tune the serving model on the catalog's images (on a `train` worker, or here when tasks run "
        "in-process), embed every image into its shadow index, evaluate both models on the same shopper-like "
        "queries and promote the new one only if it is better. Shows its progress until it ends."
    )

    def add_arguments(self, parser):
        parser.add_argument("--epochs", type=int, help="default: the recipe's for the device (docs/finetuning.md)")
        parser.add_argument("--no-wait", action="store_true", help="queue it and return")

    def handle(self, *args, epochs, no_wait, **options):
        try:
            version = finetune_start(epochs=epochs)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        self.stdout.write(f"model {version.pk}: fine-tuning of model {version.parent_id}, {version.status}")
        bar = ProgressBar(self.stdout)
        while not no_wait and version.status in ModelVersion.WORKING and not settings.CELERY_TASK_ALWAYS_EAGER:
            progress = version.progress
            detail = "".join(f"  {key} {progress[key]}" for key in ("epoch", "loss", "images_per_s", "seconds_left")
                             if key in progress)
            bar.show(progress.get("done", 0), progress.get("total", 0), f"{progress.get('stage', '')}{detail}")
            time.sleep(1)
            version.refresh_from_db()
        bar.end()
        version.refresh_from_db()
        self.stdout.write(f"model {version.pk} {version.status}" + (f": {version.decision['why']}"
                                                                     if version.decision.get("why") else ""))
        if version.status == ModelVersion.Status.FAILED:
            raise CommandError(f"model {version.pk} failed: {version.error}")
