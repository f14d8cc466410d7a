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
from django.db.models import Q
from django.utils import timezone
from django.utils.text import slugify

from catalog.models import Category, Product, ProductImage
from catalog.pipeline import images_queue_embedding
from catalog.queue import enqueue, queue_check
from ml.images import ImageDecodeError, inspect_image

logger = logging.getLogger(__name__)

# Uploads are checked by decoding them, large JPEGs at reduced size (still every byte read): at least the
# pixels any backbone's preprocessing needs, so what passes here also decodes for the model.
UPLOAD_CHECK_MIN_SIDE = 256
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif",
                     "HEIF": "heic", "AVIF": "avif"}


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


def _siblings(parent: Category | None, exclude_pk: int | None = None):
    return Category.objects.filter(parent=parent).exclude(pk=exclude_pk)


def _unique_slug(base: str, parent: Category | None, *, exclude_pk: int | None = None) -> str:
    """``base``, or ``base-2``... when a sibling has it already: a slug names a category among its siblings."""
    slug = base or "category"
    n = 2
    while _siblings(parent, exclude_pk).filter(slug=slug).exists():
        slug = f"{base}-{n}"
        n += 1
    return slug


def _where(parent: Category | None) -> str:
    return f"under {parent.path!r}" if parent is not None else "at the top level"


def _check_siblings(*, name: str | None, slug: str | None, parent: Category | None, exclude_pk: int | None = None):
    """A category's name (case aside) and slug are its own among its siblings: a duplicate is a 400."""
    if name is not None and _siblings(parent, exclude_pk).filter(name__iexact=name).exists():
        raise ValidationError({"name": f"a category named {name!r} already exists {_where(parent)}"})
    if slug and _siblings(parent, exclude_pk).filter(slug=slug).exists():
        raise ValidationError({"slug": f"a category with slug {slug!r} already exists {_where(parent)}"})


@transaction.atomic
def category_create(*, name: str, slug: str = "", parent: Category | None = None) -> Category:
    name = name.strip()
    if not name:
        raise ValidationError({"name": "a category needs a name"})
    _check_siblings(name=name, slug=slug, parent=parent)
    category = Category(name=name, slug=slug or _unique_slug(slugify(name), parent), parent=parent)
    category.save()
    return category


@transaction.atomic
def category_update(*, category: Category, **fields: Any) -> Category:
    if "parent" in fields:
        _check_parent(category=category, parent=fields["parent"])
    parent = fields.get("parent", category.parent)
    name = fields["name"].strip() if "name" in fields else category.name
    if "name" in fields:
        fields["name"] = name
    _check_siblings(name=name, slug=fields.get("slug", category.slug), parent=parent, exclude_pk=category.pk)
    return _save_fields(category, fields)


@transaction.atomic
def category_delete(*, category: Category, move_to: Category | None = None) -> dict:
    """Delete a category. One that holds products or subcategories is refused (saying how many) unless
    ``move_to`` says where they go: its products and subcategories move there first."""
    products, children = category.products.count(), category.children.count()
    if (products or children) and move_to is None:
        held = " and ".join(part for part in (
            f"{products} product{'s' * (products != 1)}" if products else "",
            f"{children} subcategor{'ies' if children != 1 else 'y'}" if children else "") if part)
        raise ValidationError({"move_to": f"category {category.path!r} holds {held}; give move_to (the id of the "
                                          "category they should go to) to move them there and delete it"})
    if move_to is not None:
        if move_to.pk == category.pk or _is_descendant(move_to, of=category):
            raise ValidationError({"move_to": f"category {move_to.path!r} is {category.path!r} or inside it; "
                                              "choose a category outside the one deleted"})
        for child in category.children.all():
            _check_siblings(name=child.name, slug=child.slug, parent=move_to, exclude_pk=child.pk)
        category.products.update(category=move_to, updated_at=timezone.now())
        category.children.update(parent=move_to, updated_at=timezone.now())
    category.delete()
    return {"products_moved": products if move_to else 0, "categories_moved": children if move_to else 0}


def _is_descendant(candidate: Category, *, of: Category) -> bool:
    node, seen = candidate.parent, set()
    while node is not None and node.pk not in seen:
        if node.pk == of.pk:
            return True
        seen.add(node.pk)
        node = node.parent
    return False


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
        category = _siblings(parent).filter(Q(slug=slug) | Q(name__iexact=part)).order_by("id").first()
        if category is None:
            try:
                with transaction.atomic():
                    category = category_create(name=part, parent=parent)
            except IntegrityError:  # a concurrent writer (another ingest worker) created this level just now
                category = _siblings(parent).get(slug=slug)
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
