"""manage.py hash_images: perceptual hashes for the images that have none, for near-duplicates."""
from django.core.management.base import BaseCommand

from catalog.management.progress import ProgressBar
from catalog.pipeline import images_fill_hashes


class Command(BaseCommand):
    help = ("Take the perceptual hash (near-duplicates' second signal) of every image that has none: images "
            "embedded before hashes were taken. Safe to stop and run again.")

    def handle(self, *args, **options):
        bar = ProgressBar(self.stdout)
        result = images_fill_hashes(on_progress=lambda done, total: bar.show(done, total, f"{done}/{total} images"))
        bar.end()
        self.stdout.write(f"{result['hashed']} images hashed; {result['unreadable']} could not be read (left as "
                          "they are)")
