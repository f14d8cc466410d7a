"""manage.py ingest: a bulk import from the command line, with a progress bar."""
import time
from contextlib import ExitStack
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files import File
from django.core.management.base import BaseCommand, CommandError

from catalog.ingest import (
    ingest_job_create,
    ingest_job_errors,
    ingest_job_refresh,
    ingest_job_start,
    ingest_rows_process,
)
from catalog.management.progress import ProgressBar
from catalog.models import IngestJob
from catalog.pipeline import images_requeue_stale

ERRORS_SHOWN = 20


class Command(BaseCommand):
    help = (
        "Import products and images from a manifest (CSV with the header sku,title,image,category,price,description, "
        "or JSON Lines with the same fields) and an optional ZIP of the images it names. Shows a progress bar "
        "until the job finishes, then the summary."
    )

    def add_arguments(self, parser):
        parser.add_argument("manifest", type=Path, help="the CSV or JSON Lines manifest")
        parser.add_argument("--archive", type=Path, help="a ZIP of the images the manifest names by path")

    def handle(self, *args, manifest: Path, archive: Path | None, **options):
        for path in (manifest, archive):
            if path is not None and not path.is_file():
                raise CommandError(f"{path} is not a file")
        eager = settings.CELERY_TASK_ALWAYS_EAGER
        try:
            with ExitStack() as files:
                m = files.enter_context(open(manifest, "rb"))
                a = files.enter_context(open(archive, "rb")) if archive else None
                # With workers the job is queued as the API queues it; without, it runs below.
                job = ingest_job_create(
                    manifest=File(m, name=manifest.name), archive=File(a, name=archive.name) if a else None,
                    start=not eager,
                )
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stdout.write(f"ingest job {job.pk}: {manifest}" + (f" with {archive}" if archive else ""))
        self._bar = ProgressBar(self.stdout)

        if eager:
            # No workers: run the chunks here, one after the other, drawing the bar between them.
            for first, last in ingest_job_start(job_id=job.pk, queue_chunks=False):
                ingest_rows_process(job_id=job.pk, first=first, last=last)
                self._draw(ingest_job_refresh(job=IngestJob.objects.get(pk=job.pk)))
        job = IngestJob.objects.get(pk=job.pk)
        try:
            while not job.is_finished:
                self._draw(job)
                time.sleep(0.5)
                if eager:
                    images_requeue_stale()  # no beat runs embedded: an image left pending is queued again here
                job = ingest_job_refresh(job=IngestJob.objects.get(pk=job.pk))
        except KeyboardInterrupt:
            self._bar.end()
            self.stdout.write(f"the job goes on in the workers; follow it at /api/ingest-jobs/{job.pk}/")
            return
        self._draw(job, final=True)
        self._summary(job)

    def _draw(self, job: IngestJob, final: bool = False) -> None:
        rate = f"  {job.images_per_s:.1f} images/s" if job.images_per_s else ""
        self._bar.show(job.processed, job.total or (1 if job.is_finished else 0),
                       f"{job.processed}/{job.total} rows  {job.succeeded} ok  {job.failed} failed{rate}", final=final)

    def _summary(self, job: IngestJob) -> None:
        seconds = (job.finished_at - job.started_at).total_seconds() if job.started_at else 0
        style = {"succeeded": self.style.SUCCESS, "completed_with_errors": self.style.WARNING}.get(
            job.status, self.style.ERROR
        )
        self.stdout.write(style(
            f"ingest job {job.pk} {job.status}: {job.total} rows, {job.succeeded} succeeded, {job.failed} failed; "
            f"{job.images_new} new images, {job.images_already} already in the catalog; {job.images_indexed} "
            f"of the job's images indexed in {seconds:.1f} s"
            + (f" ({job.images_per_s:.1f} images/s after the first, which took {job.seconds_to_first_image:.1f} s)"
               if job.images_per_s else "")
        ))
        errors = ingest_job_errors(job=job, limit=ERRORS_SHOWN)
        for error in errors:
            where = f"row {error['row']} ({error['sku']}): " if error["row"] is not None else ""
            self.stdout.write(f"  {where}{error['error']}")
        if job.failed > len(errors):
            self.stdout.write(f"  ... {job.failed - len(errors)} more at /api/ingest-jobs/{job.pk}/")
        if job.status == IngestJob.Status.FAILED:
            raise CommandError(f"ingest job {job.pk} failed")
