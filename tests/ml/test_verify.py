"""Geometric verification: a phone photo of a product agrees with its catalog image; other products, mirror
images and upside-down views do not."""
import numpy as np
from PIL import Image, ImageOps

from ml.augment import shopper_photo
from ml.verify import agreeing_points, keypoints, plausible_view
from tests.ml.photos import photo


def phone_photo(image: Image.Image, seed: int) -> Image.Image:
    """Turned, tilted, blurred, recoloured and compressed, as the evaluation's shoppers photograph."""
    shot, _ = shopper_photo(image, np.random.default_rng(seed), families=4)
    return shot


def test_a_phone_photo_agrees_with_its_product_and_not_with_another():
    coffee, astronaut = photo("coffee"), photo("astronaut")
    catalog = {"coffee": keypoints(coffee), "astronaut": keypoints(astronaut)}
    for seed in range(3):
        query = keypoints(phone_photo(coffee, seed))
        own, other = agreeing_points(query, catalog["coffee"]), agreeing_points(query, catalog["astronaut"])
        assert own >= 30, (seed, own)
        assert other < 6, (seed, other)


def test_mirror_images_and_upside_down_views_are_other_products():
    """A product's mirror-image variant (and a "b" that is a turned "q") is a different product."""
    rocket = photo("rocket")
    original = keypoints(rocket)
    assert agreeing_points(keypoints(rocket.rotate(12, expand=True)), original) >= 30
    assert agreeing_points(keypoints(ImageOps.mirror(rocket)), original) == 0
    assert agreeing_points(keypoints(rocket.rotate(180)), original) == 0


def test_a_plausible_view_is_neither_mirrored_nor_upside_down_nor_squashed():
    turn = np.radians(20)
    rotation = np.array([[np.cos(turn), -np.sin(turn), 5], [np.sin(turn), np.cos(turn), 3], [0, 0, 1]])
    assert plausible_view(np.eye(3)) and plausible_view(rotation)
    assert not plausible_view(np.diag([-1.0, 1.0, 1.0]))  # mirrored
    assert not plausible_view(np.diag([-1.0, -1.0, 1.0]))  # turned half round
    assert not plausible_view(np.diag([4.0, 1.0, 1.0]))  # squashed


def test_an_image_without_detail_agrees_with_nothing():
    blank = keypoints(Image.new("RGB", (200, 200), "white"))
    assert len(blank.descriptors) == 0
    assert agreeing_points(blank, keypoints(photo("coffee"))) == 0
