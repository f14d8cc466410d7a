"""manage.py seed_demo: the small demo catalog."""
from django.core.management.base import BaseCommand

from catalog.demo import DEMO_PRODUCTS, demo_catalog_create


class Command(BaseCommand):
    help = "Create the small demo catalog (scikit-image's bundled photos) if it is not there yet."

    def handle(self, *args, **options):
        created = demo_catalog_create()
        self.stdout.write(f"demo catalog: {created} products created, {len(DEMO_PRODUCTS) - created} already there")
