"""Reads from the catalog."""
from django.conf import settings
from django.core.files.storage import default_storage
from django.db.models import Prefetch, QuerySet
from PIL import Image

from catalog.models import Category, CategoryPrediction, Product, ProductImage
from ml.images import decode_image


def stored_image_bytes(name: str) -> bytes:
    """A stored image file's bytes (``OSError`` when it cannot be read)."""
    with default_storage.open(name, "rb") as f:
        return f.read()


def stored_image(name: str, *, min_side: int | None = None) -> Image.Image:
    """A stored image decoded under the settings' formats and pixel cap, at least ``min_side`` on its short side."""
    image, _ = decode_image(stored_image_bytes(name), allowed_formats=frozenset(settings.IMAGE_ALLOWED_FORMATS),
                            max_pixels=settings.IMAGE_MAX_PIXELS, min_side=min_side)
    return image


def category_list() -> QuerySet[Category]:
    return Category.objects.select_related("parent").order_by("slug")


def category_tree() -> list[tuple[Category, int]]:
    """Every category with its depth, in catalog order: each parent, then its children by name."""
    children: dict[int | None, list[Category]] = {}
    for category in Category.objects.order_by("name", "id"):
        children.setdefault(category.parent_id, []).append(category)
    ordered, stack = [], [(category, 0) for category in reversed(children.get(None, []))]
    while stack:
        category, depth = stack.pop()
        ordered.append((category, depth))
        stack.extend((child, depth + 1) for child in reversed(children.get(category.pk, [])))
    return ordered


def category_descendant_ids(category_id: int) -> list[int]:
    """The category and every category below it."""
    children: dict[int | None, list[int]] = {}
    for pk, parent_id in Category.objects.values_list("id", "parent_id"):
        children.setdefault(parent_id, []).append(pk)
    result, stack = [], [category_id]
    while stack:
        pk = stack.pop()
        if pk in result:
            continue
        result.append(pk)
        stack.extend(children.get(pk, []))
    return result


def product_list(*, active_only: bool = False) -> QuerySet[Product]:
    """Products with their images and suggestions prefetched; API filters narrow this further."""
    products = Product.objects.select_related("category").prefetch_related(
        Prefetch("images", queryset=ProductImage.objects.order_by("id")),
        Prefetch(
            "predictions",
            queryset=CategoryPrediction.objects.select_related("category").order_by("-score"),
        ),
    )
    if active_only:
        products = products.filter(is_active=True)
    return products.order_by("id")


def embedded_images(identity: str) -> QuerySet[ProductImage]:
    """Images with an embedding by the model `identity` that did not end failed: what its index holds."""
    return ProductImage.objects.filter(model_identity=identity, embedding__isnull=False).exclude(
        status=ProductImage.Status.FAILED
    )


def product_image_list() -> QuerySet[ProductImage]:
    return ProductImage.objects.select_related("product").order_by("id")
