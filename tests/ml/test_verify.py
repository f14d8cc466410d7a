"""Geometric verification: a phone photo of a product agrees with its catalog image; other products, mirror
images and upside-down views do not."""
import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ml.augment import shopper_photo
from ml.verify import agreeing_points, aligned_correlation, keypoints, plausible_view, template
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


def artwork(shape: str, colour=(200, 40, 40)) -> Image.Image:
    """Flat artwork on white, as a catalog's icons, letters and flags are: one colour, hardly any corners."""
    image = Image.new("RGB", (120, 120), "white")
    draw = ImageDraw.Draw(image)
    if shape == "arrow":
        draw.polygon([(15, 50), (70, 50), (70, 25), (108, 60), (70, 95), (70, 70), (15, 70)], fill=colour)
    elif shape == "flag":
        draw.rectangle((20, 15, 28, 105), fill=(60, 60, 60))
        draw.polygon([(28, 15), (100, 35), (28, 60)], fill=colour)
    else:
        draw.ellipse((20, 20, 100, 100), fill=colour)
        draw.ellipse((45, 45, 75, 75), fill="white")
    return image


def test_flat_artwork_without_local_features_still_aligns_with_its_own_image_only():
    own_aligned = 0
    for seed in range(4):
        for shape in ("arrow", "flag"):
            shot = phone_photo(artwork(shape), seed)
            assert agreeing_points(keypoints(shot), keypoints(artwork(shape))) < 6  # too few details to agree on
            own_aligned += aligned_correlation(shot, template(artwork(shape))) >= 0.9
            other = "flag" if shape == "arrow" else "arrow"
            for lookalike in (artwork(other), artwork("ring"), artwork(shape, colour=(40, 160, 60)),
                              artwork(shape, colour=(40, 40, 200)), ImageOps.mirror(artwork(shape))):
                assert aligned_correlation(shot, template(lookalike)) < 0.9, (seed, shape)
    assert own_aligned >= 6, own_aligned  # of 8 photos


def test_the_product_of_a_product_shot_is_what_stands_out_from_its_plain_background():
    shot = template(artwork("flag"))
    rows, columns = np.nonzero(shot.mask)
    assert shot.mask.shape == shot.pixels.shape[:2] and max(shot.mask.shape) == 128
    assert rows.min() == 0 and columns.min() == 0  # cropped to the product
    assert 0.2 < (shot.mask > 0).mean() < 0.8  # the white between the pole and the flag's tip is not product
    scene = template(photo("coffee"))
    assert (scene.mask > 0).all()  # not on white: the whole image
    assert template(Image.new("RGB", (50, 50), "white")) is None
    master = Image.new("RGB", (6000, 4000), "white")  # a large master is found small, its product the same
    ImageDraw.Draw(master).rectangle((1500, 1000, 4500, 3000), fill=(30, 90, 200))
    found = template(master)
    assert found.pixels.shape[1] == 128 and 84 <= found.pixels.shape[0] <= 86 and (found.mask > 0).mean() > 0.95
    assert aligned_correlation(phone_photo(artwork("arrow"), 1), None) == -1.0
