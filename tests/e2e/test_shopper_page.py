"""The shopper page in real headless Chromium (Debian's package), driven by Playwright."""
import io
import shutil

import pytest
from PIL import Image

from catalog import services
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO_ROOT / "artifacts"


@pytest.fixture
def catalog(isolated_data, offline_model, photo):
    prints = services.category_get_or_create_path(path="prints")
    for i, name in enumerate(["chelsea", "coffee", "rocket", "astronaut", "horse"]):
        product = services.product_create(sku=name.upper(), title=f"{name.title()} print", price=10 + i, category=prints)
        services.product_image_add(product=product, data=photo(name), filename=f"{name}.jpg")


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        yield page
        browser.close()


def test_a_photo_of_a_catalog_product_finds_it_first(live_server, catalog, page, photo, tmp_path):
    shot = tmp_path / "coffee-photo.jpg"
    img = Image.open(io.BytesIO(photo("coffee")))
    img.crop((40, 30, 560, 380)).save(shot)  # the shopper's own framing of the product

    page.goto(live_server.url + "/")
    page.get_by_label("Category").select_option(label="prints")
    page.locator("#photo").set_input_files(str(shot))
    page.wait_for_selector("#results li")
    assert page.locator("#preview").is_visible()
    cards = page.locator("#results li")
    assert cards.count() == 5
    assert cards.first.get_attribute("data-sku") == "COFFEE"
    assert "Coffee print" in cards.first.inner_text()
    assert "similar products" in page.locator("#status").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "shopper-search.png"), full_page=True)

    # "More like this", from the keyboard: the product itself is left out of its own neighbours.
    more = page.get_by_role("button", name="More like Coffee print")
    more.focus()
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('#results li').length === 4")
    skus = [cards.nth(i).get_attribute("data-sku") for i in range(cards.count())]
    assert "COFFEE" not in skus


def test_a_bad_file_shows_a_readable_error(live_server, catalog, page, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not a photo")
    page.goto(live_server.url + "/")
    page.locator("#photo").set_input_files(str(bad))
    page.wait_for_selector("#status.error")
    assert "not an image" in page.locator("#status").inner_text()
