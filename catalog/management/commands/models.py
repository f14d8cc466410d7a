"""manage.py models: the models the service knows; promote one or roll back the serving one."""
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from catalog.model_versions import model_list, model_promote, model_rollback
from catalog.models import ModelVersion


class Command(BaseCommand):
    help = "List the models with their figures on the catalog; --promote ID serves one, --rollback ID goes back."

    def add_arguments(self, parser):
        parser.add_argument("--promote", type=int, metavar="ID")
        parser.add_argument("--rollback", type=int, metavar="ID", help="the serving model's id")

    def handle(self, *args, promote, rollback, **options):
        try:
            if promote is not None:
                self.stdout.write(f"model {model_promote(version=self._get(promote)).pk} now serves")
            if rollback is not None:
                self.stdout.write(f"model {model_rollback(version=self._get(rollback)).pk} now serves")
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        for version in model_list():
            search = version.metrics.get("search") or {}
            categories = version.metrics.get("categories") or {}
            figures = (f"recall@1 {search['recall_at_1']:.3f}" if search else "not evaluated") + (
                f", top-1 {categories['top1']:.3f}" if categories else "")
            self.stdout.write(f"{version.pk:>4}  {version.status:<10} {version.identity or version.backbone:<32} "
                              f"{figures}  {version.decision.get('why', '')}")

    def _get(self, pk: int) -> ModelVersion:
        version = ModelVersion.objects.filter(pk=pk).first()
        if version is None:
            raise CommandError(f"there is no model {pk}")
        return version
