"""A small demo catalog built from the photos bundled with scikit-image (public domain or CC0; see
scikit-image's data/README). Several products share a subject, so similar-image search has neighbours."""
import io

import numpy as np
from PIL import Image, ImageOps

from catalog import services
from catalog.models import Product

# (sku, title, category path, price, scikit-image photo, variant)
DEMO_PRODUCTS = [
    ("DEMO-CAT-1", "Tabby cat poster", "prints/animals", "19.00", "chelsea", "full"),
    ("DEMO-CAT-2", "Tabby cat close-up print", "prints/animals", "24.00", "chelsea", "crop"),
    ("DEMO-CAT-3", "Tabby cat mirrored card", "cards/animals", "4.50", "chelsea", "mirror"),
    ("DEMO-HORSE-1", "Horse silhouette print", "prints/animals", "21.00", "horse", "full"),
    ("DEMO-COFFEE-1", "Coffee cup poster", "prints/food", "18.00", "coffee", "full"),
    ("DEMO-COFFEE-2", "Coffee cup close-up card", "cards/food", "4.00", "coffee", "crop"),
    ("DEMO-ROCKET-1", "Rocket launch poster", "prints/vehicles", "22.00", "rocket", "full"),
    ("DEMO-ROCKET-2", "Rocket launch card", "cards/vehicles", "4.50", "rocket", "crop"),
    ("DEMO-ASTRO-1", "Astronaut portrait poster", "prints/space", "25.00", "astronaut", "full"),
    ("DEMO-HUBBLE-1", "Deep field galaxy poster", "prints/space", "29.00", "hubble_deep_field", "full"),
    ("DEMO-MOON-1", "Moon surface print", "prints/space", "17.00", "moon", "full"),
    ("DEMO-CLOCK-1", "Wall clock photo print", "prints/household", "15.00", "clock", "full"),
    ("DEMO-COINS-1", "Old coins print", "prints/household", "12.00", "coins", "full"),
    ("DEMO-BRICK-1", "Brick wall texture", "textures", "9.00", "brick", "full"),
    ("DEMO-GRASS-1", "Grass texture", "textures", "9.00", "grass", "full"),
    ("DEMO-GRAVEL-1", "Gravel texture", "textures", "9.00", "gravel", "full"),
    ("DEMO-NEW-1", "Uncategorized cat print", "", "20.00", "chelsea", "crop2"),
    ("DEMO-NEW-2", "Uncategorized coffee print", "", "16.00", "coffee", "mirror"),
]


def skimage_photo(name: str) -> Image.Image:
    """One of scikit-image's bundled photos as an RGB image."""
    from skimage import data  # on first use: scikit-image takes a second to import, and only the demo needs it

    pixels = getattr(data, name)()
    if pixels.dtype == bool:  # a silhouette: True is the white background
        pixels = pixels.astype(np.uint8) * 255
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return Image.fromarray(pixels[..., :3].astype(np.uint8))


def _photo(name: str, variant: str) -> bytes:
    img = skimage_photo(name)
    w, h = img.size
    if variant == "crop":
        img = img.crop((w // 8, h // 8, w - w // 8, h - h // 8))
    elif variant == "crop2":
        img = img.crop((w // 10, 0, w - w // 6, h - h // 10))
    elif variant == "mirror":
        img = ImageOps.mirror(img)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def demo_catalog_create() -> int:
    """Create the demo products that are missing; returns how many were created. Safe to run again."""
    created = 0
    for sku, title, category_path, price, photo, variant in DEMO_PRODUCTS:
        if Product.objects.filter(sku=sku).exists():
            continue
        category = services.category_get_or_create_path(path=category_path) if category_path else None
        product = services.product_create(sku=sku, title=title, price=price, category=category)
        services.product_image_add(product=product, data=_photo(photo, variant), filename=f"{photo}.jpg")
        created += 1
    return created
