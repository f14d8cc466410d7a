"""manage.py evaluate: the serving model measured on the catalog's own images, with its HTML report."""
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.urls import reverse

from catalog.evaluation import evaluation_run
from catalog.model_versions import serving_version
from catalog.precision_choice import precision_choose


class Command(BaseCommand):
    help = (
        "Evaluate the serving model on the catalog: search recall@1, recall@10 and MRR of shopper-like photos "
        "of catalog products, and category top-1/top-5 of held-out products; writes the HTML report the admin "
        "links to."
    )

    def handle(self, *args, **options):
        version = serving_version()
        if version is None:
            raise CommandError("no model serves yet: upload product images first")
        try:
            metrics = evaluation_run(version_id=version.pk)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        if "error" in metrics:
            raise CommandError(metrics["error"])
        search, categories = metrics["search"], metrics["categories"]
        self.stdout.write(self.style.SUCCESS(
            f"model {version.pk} ({version.identity}): {metrics['queries']} queries, search recall@1 "
            f"{search['recall_at_1']:.3f}, recall@10 {search['recall_at_10']:.3f}, MRR {search['mrr']:.3f}"
            + (f"; category top-1 {categories['top1']:.3f}, top-5 {categories['top5']:.3f}" if categories else
               "; category figures need at least two categories with held-out products")
        ))
        self.stdout.write(f"report: {reverse('admin:catalog_modelversion_report', args=[version.pk])}")
        decision = precision_choose(version_id=version.pk)
        if decision is not None:
            self.stdout.write(f"precision on this machine kind: {decision['chosen']} ({decision['reason']})")
