"""manage.py evaluate_categorizer: the categorizer's HTML evaluation report."""
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.urls import reverse

from catalog.categorizer import categorizer_latest_report, categorizer_report_write
from catalog.models import CategorizerVersion

HELP = (
    "Write the evaluation report of the categorizer in service (or --id): an HTML page with PNG plots "
    "of the held-out confusion matrix, per-category precision and recall, what an apply threshold means, "
    "and the products whose category looks unlikely. The admin links to the latest report."
)


class Command(BaseCommand):
    help = HELP

    def add_arguments(self, parser):
        parser.add_argument("--id", type=int, help="id of a ready categorizer version (default: the one in service)")

    def handle(self, *args, id: int | None, **options):
        chosen = None
        if id is not None:
            chosen = CategorizerVersion.objects.filter(pk=id).first()
            if chosen is None:
                raise CommandError(f"there is no categorizer version {id}")
        try:
            path = categorizer_report_write(version=chosen)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        self.stdout.write(self.style.SUCCESS(f"report written to {path}"))
        latest = categorizer_latest_report()
        self.stdout.write(f"in the admin: {reverse('admin:catalog_categorizerversion_report', args=[latest.pk])}")
