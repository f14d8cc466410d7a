"""Objects found in a photo, and where two images agree, from the backbone's own feature maps."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from ml.embedder import load_embedder
from ml.localize import agreement, content_box, heatmap_png, object_boxes, to_image
from tests.ml.photos import photo


@pytest.fixture(scope="module")
def model():
    return load_embedder("efficientnet_lite0", "imagenet")


def on_plain_background(products: list[Image.Image], size=(640, 360), colour=(244, 242, 238), seed=0):
    """Products pasted side by side on a plain, slightly noisy surface; returns the photo and their boxes."""
    rng = np.random.default_rng(seed)
    canvas = np.full((size[1], size[0], 3), colour, dtype=np.float32) + rng.normal(0, 2, (size[1], size[0], 3))
    photo = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    boxes, x = [], 30
    for product in products:
        product = product.copy()
        product.thumbnail((size[0] // len(products) - 60, size[1] - 60))
        y = (size[1] - product.height) // 2
        photo.paste(product, (x, y))
        boxes.append((x / size[0], y / size[1], (x + product.width) / size[0], (y + product.height) / size[1]))
        x += product.width + 60
    return photo, boxes


def iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_two_products_side_by_side_are_two_objects(model):
    scene, truth = on_plain_background([photo("coffee"), photo("rocket")])
    maps = model.embed([scene], maps=True).maps[0]
    found = object_boxes(scene, maps, model.preset)
    assert len(found) >= 2
    for expected in truth:
        assert max(iou(expected, box.as_list()) for box in found) >= 0.5, (expected, found)
    assert all(0 <= v <= 1 for box in found for v in box.as_list())


def test_the_content_box_follows_the_pad_geometry(model):
    assert content_box(model.preset, (400, 200)) == pytest.approx((0, 56, 224, 112))
    cells = np.zeros((7, 7), np.float32)
    cells[3, 0] = 1  # the left edge of the square, at mid height
    heat = to_image(cells, model.preset, (400, 200), out=(40, 20))
    assert heat[10, :5].mean() > heat[10, 30:].mean()


def test_the_hot_region_of_a_product_on_a_plain_background_lies_on_the_product(model):
    product = photo("coffee")
    product.thumbnail((200, 200))  # 200 x 133
    scene = Image.new("RGB", (600, 400), (255, 255, 255))
    scene.paste(product, (360, 150))  # right, lower part of the scene
    maps = model.embed([scene, product], maps=True).maps
    query_heat, match_heat = agreement(maps[0], maps[1])
    heat = to_image(query_heat, model.preset, scene.size, out=(60, 40))  # a cell is 10 x 10 pixels
    on_product = heat[15:28, 36:56].mean()
    elsewhere = np.concatenate([heat[:, :30].ravel(), heat[:12].ravel()]).mean()
    assert on_product > 3 * elsewhere, (on_product, elsewhere)
    row, column = np.unravel_index(np.argmax(heat), heat.shape)
    cell = 600 / 7 / 10  # one cell of the 7 x 7 feature map, in this grid's units
    assert 15 - cell <= row <= 28 + cell and 36 - cell <= column <= 56 + cell, "the hottest spot is on the product"
    assert 0 <= match_heat.min() and match_heat.max() == pytest.approx(1.0)

    url = heatmap_png(scene, query_heat, model.preset, width=120)
    assert url.startswith("data:image/png;base64,")
    drawn = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert drawn.size == (120, 80)
