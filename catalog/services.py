"""Writes to the catalog. Views, admin actions, commands and tasks all come through here.

Bad input raises django.core.exceptions.ValidationError with a message a person can act on;
the API turns it into a 400 and nothing is changed.
"""
import hashlib
import logging
from decimal import Decimal, InvalidOperation
from pathlib import PurePath
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.utils.text import slugify

from catalog.models import Category, Product, ProductImage
from catalog.pipeline import images_queue_embedding
from catalog.queue import enqueue, queue_check
from ml.images import ImageDecodeError, inspect_image

logger = logging.getLogger(__name__)

# Uploads are checked by decoding them, large JPEGs at reduced size (still every byte read): at least the
# pixels any backbone's preprocessing needs, so what passes here also decodes for the model.
UPLOAD_CHECK_MIN_SIDE = 256
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def _save_fields(instance, fields: dict[str, Any]):
    """Set the checked fields on a row and save it; returns the row."""
    for name, value in fields.items():
        setattr(instance, name, value)
    instance.save()
    return instance


# Categories

def _check_parent(*, category: Category | None, parent: Category | None) -> None:
    node = parent
    while node is not None:
        if category is not None and node.pk == category.pk:
            raise ValidationError({"parent": "a category cannot be its own ancestor"})
        node = node.parent


def _unique_slug(base: str, *, exclude_pk: int | None = None) -> str:
    slug = base or "category"
    n = 2
    while Category.objects.filter(slug=slug).exclude(pk=exclude_pk).exists():
        slug = f"{base}-{n}"
        n += 1
    return slug


@transaction.atomic
def category_create(*, name: str, slug: str = "", parent: Category | None = None) -> Category:
    name = name.strip()
    if not name:
        raise ValidationError({"name": "a category needs a name"})
    if slug and Category.objects.filter(slug=slug).exists():
        raise ValidationError({"slug": f"a category with slug {slug!r} already exists"})
    category = Category(name=name, slug=slug or _unique_slug(slugify(name)), parent=parent)
    category.save()
    return category


@transaction.atomic
def category_update(*, category: Category, **fields: Any) -> Category:
    if "parent" in fields:
        _check_parent(category=category, parent=fields["parent"])
    if "slug" in fields and Category.objects.filter(slug=fields["slug"]).exclude(pk=category.pk).exists():
        raise ValidationError({"slug": f"a category with slug {fields['slug']!r} already exists"})
    return _save_fields(category, fields)


@transaction.atomic
def category_delete(*, category: Category) -> None:
    if category.children.exists():
        raise ValidationError(
            f"category {category.path!r} has subcategories; delete or move them first"
        )
    category.delete()  # its products become uncategorized


@transaction.atomic
def category_get_or_create_path(*, path: str) -> Category:
    """The category at a slash path such as "food/fruit", creating missing levels."""
    parent = None
    parts = [p.strip() for p in path.strip("/").split("/") if p.strip()]
    if not parts:
        raise ValidationError({"category": "an empty category path"})
    for part in parts:
        slug = slugify(part)
        if not slug:
            raise ValidationError({"category": f"{part!r} is not a usable category name"})
        category = Category.objects.filter(slug=slug, parent=parent).first()
        if category is None:
            try:
                with transaction.atomic():
                    category = category_create(name=part, parent=parent)
            except IntegrityError:  # a concurrent writer (another ingest worker) created this level just now
                category = Category.objects.get(slug=slug, parent=parent)
        parent = category
    return parent


# Products

def _clean_price(price: Any) -> Decimal | None:
    if price is None or price == "":
        return None
    try:
        value = Decimal(str(price))
    except InvalidOperation:
        raise ValidationError({"price": f"{price!r} is not a number"}) from None
    if not value.is_finite() or value < 0:
        raise ValidationError({"price": "price must be a non-negative number"})
    return value.quantize(Decimal("0.01"))


@transaction.atomic
def product_create(
    *,
    sku: str,
    title: str,
    description: str = "",
    price: Any = None,
    currency: str = "",
    category: Category | None = None,
    attributes: dict | None = None,
    is_active: bool = True,
) -> Product:
    sku = sku.strip()
    if not sku:
        raise ValidationError({"sku": "a product needs a sku"})
    if Product.objects.filter(sku=sku).exists():
        raise ValidationError({"sku": f"a product with sku {sku!r} already exists"})
    product = Product(
        sku=sku,
        title=title.strip(),
        description=description,
        price=_clean_price(price),
        currency=(currency or settings.DEFAULT_CURRENCY).upper(),
        category=category,
        attributes=attributes or {},
        is_active=is_active,
    )
    product.save()
    return product


@transaction.atomic
def product_update(*, product: Product, **fields: Any) -> Product:
    if "sku" in fields:
        fields["sku"] = fields["sku"].strip()
        if Product.objects.filter(sku=fields["sku"]).exclude(pk=product.pk).exists():
            raise ValidationError({"sku": f"a product with sku {fields['sku']!r} already exists"})
    if "price" in fields:
        fields["price"] = _clean_price(fields["price"])
    if "currency" in fields:
        fields["currency"] = fields["currency"].upper()
    return _save_fields(product, fields)


@transaction.atomic
def product_delete(*, product: Product) -> None:
    image_ids = list(product.images.values_list("id", flat=True))
    files = [image.file.name for image in product.images.all()]
    product.delete()
    transaction.on_commit(lambda: _after_images_deleted(image_ids, files))


# Images

def product_image_add(
    *, product: Product, data: bytes, filename: str = "", queue: bool = True
) -> tuple[ProductImage, bool]:
    """Store an uploaded image for a product. Returns (image, created); the same bytes twice are one image.

    With queue=False the caller queues the new image for embedding itself (in batches).

    The bytes are decoded in full before anything is stored, so a file the model could never read is
    refused here with a readable reason instead of failing later in a worker.
    """
    if not data:
        raise ValidationError({"image": "the uploaded file is empty"})
    if len(data) > settings.MAX_UPLOAD_BYTES:
        raise ValidationError(
            {"image": f"the file is {len(data) / 1e6:.1f} MB, over the "
                      f"{settings.MAX_UPLOAD_BYTES / 1e6:.1f} MB limit"}
        )
    try:
        info = inspect_image(
            data, allowed_formats=frozenset(settings.IMAGE_ALLOWED_FORMATS), max_pixels=settings.IMAGE_MAX_PIXELS,
            min_side=UPLOAD_CHECK_MIN_SIDE,
        )
    except ImageDecodeError as exc:
        raise ValidationError({"image": str(exc)}) from None

    sha256 = hashlib.sha256(data).hexdigest()
    existing = ProductImage.objects.filter(product=product, sha256=sha256).first()
    if existing is not None:
        return existing, False
    if queue:
        queue_check()  # accept nothing that cannot be queued: the client gets a 503 and retries

    ext = FORMAT_EXTENSIONS.get(info.format, "img")
    stem = PurePath(filename).stem[:40] if filename else "image"
    name = f"{sha256[:2]}/{sha256}-{slugify(stem) or 'image'}.{ext}"
    try:
        with transaction.atomic():
            image = ProductImage(
                product=product, sha256=sha256, width=info.width, height=info.height,
                status=ProductImage.Status.PENDING,
            )
            image.file.save(name, ContentFile(data), save=False)
            image.save()
            if queue:
                transaction.on_commit(lambda: _after_image_added(image.pk))
    except IntegrityError:
        # A concurrent upload of the same bytes won the race; theirs is the one image.
        return ProductImage.objects.get(product=product, sha256=sha256), False
    return image, True


@transaction.atomic
def product_image_delete(*, image: ProductImage) -> None:
    image_id, name = image.pk, image.file.name
    image.delete()
    transaction.on_commit(lambda: _after_images_deleted([image_id], [name]))


def _after_image_added(image_id: int) -> None:
    images_queue_embedding(image_ids=[image_id])


def _after_images_deleted(image_ids: list[int], file_names: list[str]) -> None:
    if image_ids:
        enqueue("index_images", remove_ids=image_ids)

    still_used = set(ProductImage.objects.filter(file__in=file_names).values_list("file", flat=True))
    for name in file_names:
        if name and name not in still_used:
            try:
                default_storage.delete(name)
            except OSError:
                logger.warning("could not delete stored file %s", name, exc_info=True)
