"""The shopper page in real headless Chromium (Debian's package), driven by Playwright, on a desktop and a phone.

Each test runs at both viewports and leaves a screenshot in artifacts/ (kept by CI)."""
import io
import re
import shutil

import pytest
from PIL import Image

from catalog import process_cache, services
from catalog.model_versions import serving_version
from catalog.models import ModelVersion
from catalog.search import search_catalog
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO_ROOT / "artifacts"
VIEWPORTS = {"desktop": {"viewport": {"width": 1200, "height": 900}},
             "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True,
                       "device_scale_factor": 2}}
PRINTS = ["chelsea", "coffee", "rocket", "astronaut", "horse", "clock", "coins"]
TEXTURES = ["brick", "grass", "gravel", "moon", "hubble_deep_field"]


def coffee_shot(photo) -> bytes:
    """The shopper's own framing of the coffee print."""
    out = io.BytesIO()
    Image.open(io.BytesIO(photo("coffee"))).crop((40, 30, 560, 380)).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture
def catalog(isolated_data, offline_model, photo):
    """12 products in a category tree (decor/frames stays empty), and the served model's match thresholds
    placed between this catalog's own scores for the coffee photo: its product is "same", the tenth and later
    "weak"."""
    services.category_get_or_create_path(path="decor/frames")
    prints, textures = (services.category_get_or_create_path(path=p) for p in ("prints", "textures"))
    for number, name in enumerate(PRINTS + TEXTURES):
        product = services.product_create(sku=name.upper(), title=f"{name.replace('_', ' ').title()} print",
                                          price=10 + number, category=prints if name in PRINTS else textures)
        services.product_image_add(product=product, data=photo(name), filename=f"{name}.jpg")
    scores = [hit.score for hit in search_catalog(image_data=coffee_shot(photo), k=12).hits]
    version = serving_version()
    ModelVersion.objects.filter(pk=version.pk).update(metrics={"calibration": {
        "same_product": (scores[0] + scores[1]) / 2, "weak": (scores[8] + scores[9]) / 2}})
    process_cache.clear_all()


@pytest.fixture(params=sorted(VIEWPORTS))
def viewport(request):
    return request.param


@pytest.fixture
def page(viewport):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        context = browser.new_context(**VIEWPORTS[viewport])
        # Each search's form fields as the page sent them (files by name): Playwright does not report
        # multipart bodies that hold a file.
        context.add_init_script("""window.__sent = [];
            const send = window.fetch;
            window.fetch = (url, options) => {
              if (options && options.body instanceof FormData) {
                window.__sent.push({url: String(url), fields: Object.fromEntries([...options.body.entries()].map(
                  ([name, value]) => [name, value instanceof File ? `file:${value.name}` : value]))});
              }
              return send(url, options);
            };""")
        page = context.new_page()
        page.viewport_name = viewport
        yield page
        browser.close()


@pytest.fixture
def shot(tmp_path, photo):
    path = tmp_path / "coffee-photo.jpg"
    path.write_bytes(coffee_shot(photo))
    return str(path)


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"shopper-{name}-{page.viewport_name}.png"), full_page=True)


def skus(page, selector: str = "#results li") -> list[str]:
    cards = page.locator(selector)
    return [cards.nth(i).get_attribute("data-sku") for i in range(cards.count())]


def search_with(page, path: str) -> None:
    status = page.locator("#status").inner_text()
    page.locator("#photo").set_input_files(path)
    page.wait_for_function("(before) => { const s = document.getElementById('status').textContent;"
                           " return s !== before && !s.startsWith('Searching'); }", arg=status)


def searched(page, action) -> dict:
    """Run ``action``, wait for the search it starts to be answered and shown; the form fields it sent."""
    with page.expect_response("**/api/search/"):
        action()
    page.wait_for_function("!document.querySelector('main').hasAttribute('aria-busy')")
    return page.evaluate("window.__sent.filter((s) => s.url.endsWith('/api/search/')).at(-1).fields")


def prices(page, low: str, high: str) -> None:
    """Type a price range as a shopper does: both fields, then leave them (one change event)."""
    page.locator("#min-price").evaluate("(e, v) => { e.value = v; }", low)
    page.locator("#max-price").evaluate("(e, v) => { e.value = v; }", high)
    page.locator("#max-price").dispatch_event("change")


def test_before_a_search_nothing_is_shown_but_the_drop_zone(live_server, catalog, page):
    page.goto(live_server.url + "/")
    assert page.locator("#drop-zone").is_visible()
    for hidden in ("#preview", "#photo-area", "#results-heading", "#weak-heading", "#insights", "#show-more", "#empty"):
        assert not page.locator(hidden).is_visible(), hidden
    # The categories as a tree in catalog order: each parent, then its children, indented.
    options = page.locator("#category option").all_inner_texts()
    assert [o.replace("\u00a0", " ") for o in options] == ["All categories", "decor", "   frames", "prints", "textures"]
    screenshot(page, "empty-page")


def test_a_photo_finds_its_product_first_marked_this_product_and_weak_ones_apart(live_server, catalog, page, shot):
    page.add_init_script("""window.__during = [];
        const original = window.fetch;
        window.fetch = (...args) => {
          window.__during.push({disabled: document.getElementById('search-button').disabled,
                                busy: document.querySelector('main').getAttribute('aria-busy'),
                                status: document.getElementById('status').textContent});
          return original(...args);
        };""")
    page.goto(live_server.url + "/")
    search_with(page, shot)
    # While the search ran the button was disabled and the page said so.
    assert page.evaluate("window.__during") == [{"disabled": True, "busy": "true", "status": "Searching…"}]
    assert page.locator("#search-button").is_enabled()
    assert page.locator("#preview").is_visible()
    first = page.locator("#results li").first
    assert first.get_attribute("data-sku") == "COFFEE" and first.get_attribute("data-match") == "same_product"
    assert first.locator(".badge").is_visible() and first.locator(".badge").inner_text() == "This product"
    assert page.locator("#results li .badge:visible").count() == 1
    # Weak matches are grouped under "Less similar"; no card shows a raw score.
    assert page.locator("#weak-heading").is_visible() and page.locator("#weak-results li").count() >= 1
    assert all(card == "weak" for card in page.locator("#weak-results li").evaluate_all("l => l.map(e => e.dataset.match)"))
    assert not re.search(r"(?<!\d)0\.\d{3}", page.locator("#results").inner_text() + page.locator("#weak-results").inner_text())
    assert len(skus(page)) + len(skus(page, "#weak-results li")) == 10
    assert "this product among them" in page.locator("#status").inner_text()
    # "Likely category" never lists an entry at 0 %.
    assert page.locator("#insights").is_visible() and "(0%)" not in page.locator("#predicted").inner_text()
    if page.viewport_name == "phone":  # two columns of cards
        boxes = page.locator("#results li, #weak-results li").evaluate_all(
            "l => l.map(e => Math.round(e.getBoundingClientRect().left))")
        assert len(set(boxes)) == 2, boxes
    screenshot(page, "photo-search")


def test_show_more_the_price_range_and_an_empty_category(live_server, catalog, page, shot):
    page.goto(live_server.url + "/")
    search_with(page, shot)
    assert page.locator("#show-more").is_visible()
    body = searched(page, lambda: page.locator("#show-more").click())
    assert body["k"] == "20"
    assert len(skus(page)) + len(skus(page, "#weak-results li")) == 12 and not page.locator("#show-more").is_visible()
    # A price range: the same photo again, only products from 11.00 to 13.00 (COFFEE, ROCKET, ASTRONAUT).
    body = searched(page, lambda: prices(page, "11", "13"))
    assert body["min_price"] == "11" and body["max_price"] == "13"
    assert sorted(skus(page) + skus(page, "#weak-results li")) == ["ASTRONAUT", "COFFEE", "ROCKET"]
    searched(page, lambda: prices(page, "", ""))
    # An empty category offers to widen the search.
    searched(page, lambda: page.get_by_label("Category").select_option(label="\u00a0\u00a0\u00a0frames"))
    assert page.locator("#empty").is_visible() and not skus(page)
    screenshot(page, "empty-category")
    searched(page, lambda: page.get_by_role("button", name="Search all categories").click())
    assert page.locator("#category").input_value() == "" and skus(page)[0] == "COFFEE"


def test_more_like_this_hides_the_photo_follows_the_filters_and_goes_back(live_server, catalog, page, shot):
    page.goto(live_server.url + "/")
    search_with(page, shot)
    more = page.get_by_role("button", name="More like Coffee print")
    more.focus()
    body = searched(page, lambda: page.keyboard.press("Enter"))
    assert "product" in body and "image" not in body
    assert not page.locator("#preview").is_visible() and not page.locator("#photo-area").is_visible()
    assert page.locator("#context").is_visible() and "More like “Coffee print”" in page.locator("#context").inner_text()
    assert "COFFEE" not in skus(page) + skus(page, "#weak-results li")
    screenshot(page, "more-like-this")
    # A category chosen now re-runs "more like this" in it, not the photo search.
    body = searched(page, lambda: page.get_by_label("Category").select_option(label="textures"))
    assert "product" in body and "image" not in body
    found = skus(page) + skus(page, "#weak-results li")
    assert found and set(found) <= {name.upper() for name in TEXTURES}
    # The way back: the photo and its search again.
    body = searched(page, lambda: page.get_by_role("button", name="Back to your photo").click())
    assert body["image"] == "file:coffee-photo.jpg"
    assert page.locator("#preview").is_visible() and not page.locator("#context").is_visible()


def test_an_error_clears_the_results_and_the_likely_category(live_server, catalog, page, shot, tmp_path):
    page.goto(live_server.url + "/")
    search_with(page, shot)
    assert skus(page) and page.locator("#insights").is_visible()
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not a photo")
    page.locator("#photo").set_input_files(str(bad))
    page.wait_for_selector("#status.error")
    error = page.locator("#status").inner_text()
    assert error.startswith("not an image") and not error.startswith("image")
    assert not skus(page) and not skus(page, "#weak-results li")
    assert not page.locator("#insights").is_visible() and not page.locator("#results-heading").is_visible()
    screenshot(page, "error")


def test_objects_found_in_the_photo_and_a_box_drawn_by_hand_search_that_region(live_server, catalog, page, photo,
                                                                               tmp_path):
    pair = Image.new("RGB", (1000, 420), "white")
    pair.paste(Image.open(io.BytesIO(photo("coffee"))).resize((450, 300)), (20, 60))
    pair.paste(Image.open(io.BytesIO(photo("rocket"))).resize((250, 400)), (700, 10))
    path = tmp_path / "pair.jpg"
    pair.save(path)
    page.goto(live_server.url + "/")
    search_with(page, str(path))
    objects = page.locator("#boxes button")
    assert objects.count() >= 1 and objects.first.is_visible()
    screenshot(page, "objects")
    body = searched(page, lambda: objects.first.click())
    assert "box" in body and objects.first.get_attribute("class") == "chosen"
    assert page.locator("#whole-photo").is_visible()

    # A box drawn around the rocket (right quarter of the photo): by mouse on a desktop, by finger on a phone.
    page.locator("#preview").scroll_into_view_if_needed()
    frame = page.locator("#preview").bounding_box()
    start = (frame["x"] + frame["width"] * 0.71, frame["y"] + frame["height"] * 0.03)
    end = (frame["x"] + frame["width"] * 0.94, frame["y"] + frame["height"] * 0.97)
    if page.viewport_name == "phone":
        cdp = page.context.new_cdp_session(page)

        def touch(kind, point):
            cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [] if kind == "touchEnd" else
                                                  [{"x": point[0], "y": point[1], "id": 1}]})

        def draw():
            touch("touchStart", start)
            for step in range(1, 6):
                touch("touchMove", (start[0] + (end[0] - start[0]) * step / 5, start[1] + (end[1] - start[1]) * step / 5))
            touch("touchEnd", end)
    else:
        def draw():
            page.mouse.move(*start)
            page.mouse.down()
            page.mouse.move(*end, steps=5)
            page.mouse.up()
    body = searched(page, draw)
    box = [float(v) for v in body["box"].split(",")]
    assert 0.66 < box[0] < 0.76 and 0.89 < box[2] < 0.99 and box[1] < 0.1 and box[3] > 0.9, box
    assert page.locator("#drawn").is_visible()
    assert skus(page)[0] == "ROCKET"
    screenshot(page, "drawn-box")


def test_why_shows_where_the_photo_and_the_product_agree(live_server, catalog, page, shot):
    page.goto(live_server.url + "/")
    search_with(page, shot)
    first = page.locator("#results li").first
    with page.expect_response("**/api/search/explain/") as answer:
        first.get_by_role("button", name="Why Coffee print matched").click()
    assert answer.value.status == 200
    panel = first.locator(".explanation")
    panel.wait_for(state="visible")
    for image in (".query-heat", ".match-heat"):
        heat = first.locator(image)
        assert heat.get_attribute("src").startswith("data:image/png;base64,")
        page.wait_for_function("(e) => e.complete && e.naturalWidth > 0", arg=heat.element_handle())
    screenshot(page, "why")
    first.get_by_role("button", name="Why Coffee print matched").click()
    assert not panel.is_visible()


def test_the_api_docs_render_with_no_request_leaving_the_host(live_server, catalog, page):
    outside = []

    def only_this_host(route):
        if route.request.url.startswith(live_server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_host)
    page.goto(live_server.url + "/api/docs/")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "visualsearch" in page.locator(".swagger-ui .info .title").inner_text().lower()
    page.wait_for_selector(".opblock-tag")
    assert not outside, outside
    screenshot(page, "api-docs")
