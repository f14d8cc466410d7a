"""manage.py reindex: rebuild the vector index from the database, or verify and repair it."""
import json
import resource

from django.core.management.base import BaseCommand

from catalog.indexing import index_rebuild, index_verify
from catalog.management.progress import ProgressBar


class Command(BaseCommand):
    help = (
        "Rebuild the vector index from the database and swap it in atomically. With --verify: report images "
        "missing from the index and index entries with no image, and repair both."
    )

    def add_arguments(self, parser):
        parser.add_argument("--verify", action="store_true", help="compare index and database, then repair")
        parser.add_argument("--dry-run", action="store_true", help="with --verify: report only, change nothing")

    def handle(self, *args, verify: bool, dry_run: bool, **options):
        if not verify:
            bar = ProgressBar(self.stdout)
            result = index_rebuild(on_progress=lambda stage, done, total: bar.show(
                done, total, f"{stage}: {done}/{total} images"))
            bar.end()
            self.stdout.write(
                f"index of {result['identity']}: {result['indexed']} images published"
                + (f" (version {result['version']}, {result['kind']})" if result["indexed"] else "")
                + f"; {result['queued_for_embedding']} images queued for embedding"
            )
            if result["indexed"]:
                recall = result["recall_at_10"]
                self.stdout.write(f"search: {result['note']}" + (f"; recall@10 {recall:.3f}" if recall else ""))
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.stdout.write(f"peak memory of this process: {peak_mb:.0f} MB")
            return
        report = index_verify(repair=not dry_run)
        self.stdout.write(
            f"index of {report['identity']}: {report['in_database']} embedded images in the database, "
            f"{report['in_index']} in the index"
        )
        self.stdout.write(f"missing from the index: {len(report['missing'])} {report['missing'][:20]}")
        self.stdout.write(f"index entries with no image: {len(report['orphans'])} {report['orphans'][:20]}")
        if report["repaired"]:
            self.stdout.write(self.style.SUCCESS("repaired: the index now matches the database"))
        elif not report["missing"] and not report["orphans"]:
            self.stdout.write(self.style.SUCCESS("the index matches the database"))
        self.stdout.write(json.dumps({k: (len(v) if isinstance(v, list) else v) for k, v in report.items()}))
