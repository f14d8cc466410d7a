"""The admin's change lists on a 1280 px screen, in real headless Chromium: nothing wider than the window."""
import shutil

import pytest
from django.contrib.auth import get_user_model

from catalog import services
from catalog.models import IngestJob
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LISTS = ["product", "productimage", "ingestjob", "categoryprediction", "duplicatepair", "modelversion"]


@pytest.fixture
def catalog(isolated_data, offline_model, photo):
    shelf = services.category_get_or_create_path(path="home and garden/kitchen storage/long-named shelving units")
    for number, name in enumerate(["chelsea", "coffee", "rocket"]):
        product = services.product_create(
            sku=f"A-VERY-LONG-SUPPLIER-SKU-{number:04d}-WITH-A-VARIANT-SUFFIX",
            title="An uncommonly long product title, as suppliers write them, with every option spelled out " * 2,
            price=10 + number, category=shelf)
        services.product_image_add(product=product, data=photo(name), filename=f"{name}.jpg")
    IngestJob.objects.create(manifest_format="csv", manifest_name="a-supplier-manifest-with-a-long-name-2026.csv",
                             status="completed_with_errors", total=1000, processed=1000, succeeded=990, failed=10)


def test_every_change_list_fits_a_1280_pixel_screen(live_server, catalog):
    from playwright.sync_api import sync_playwright

    get_user_model().objects.create_superuser("root", password="root-pass-123")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(live_server.url + "/admin/login/")
        page.fill("#id_username", "root")
        page.fill("#id_password", "root-pass-123")
        page.click("input[type=submit]")
        wide = {}
        for name in LISTS:
            page.goto(f"{live_server.url}/admin/catalog/{name}/")
            width = page.evaluate("document.documentElement.scrollWidth")
            if width > 1280:
                wide[name] = width
        (REPO_ROOT / "artifacts").mkdir(exist_ok=True)
        page.goto(f"{live_server.url}/admin/catalog/product/")
        page.screenshot(path=str(REPO_ROOT / "artifacts" / "admin-products-1280.png"), full_page=True)
        browser.close()
    assert not wide, f"change lists wider than the screen: {wide}"
