"""Why a result matched: which regions of the query and of the catalog image agree, as two heat maps."""
from django.core.exceptions import ValidationError
from django.core.files.storage import default_storage

from catalog.models import Product, ProductImage
from catalog.search import crop_to, decode_query
from catalog.serving import embed_query, query_embedder
from ml.localize import agreement, heatmap_png


def _stored_image(image: ProductImage, min_side: int):
    try:
        with default_storage.open(image.file.name, "rb") as f:
            data = f.read()
    except OSError:
        raise ValidationError({"image": f"the stored file of image {image.pk} cannot be read"}) from None
    return decode_query(data, min_side)


def explain_match(*, image_id: int, image_data: bytes | None = None, product_id: int | None = None,
                  box: list[float] | None = None) -> dict:
    """{"query_heatmap", "match_heatmap"}: PNG data URLs, hot where the two images agree."""
    match = ProductImage.objects.filter(pk=image_id, product__is_active=True).first()
    if match is None:
        raise ValidationError({"image": f"there is no catalog image {image_id}"})
    model = query_embedder()
    if image_data is not None:
        query = crop_to(decode_query(image_data, model.min_side), box)
    else:
        if not Product.objects.filter(pk=product_id).exists():
            raise ValidationError({"product": f"there is no product {product_id}"})
        first = ProductImage.objects.filter(product_id=product_id).exclude(status=ProductImage.Status.FAILED).first()
        if first is None:
            raise ValidationError({"product": f"product {product_id} has no image"})
        query = _stored_image(first, model.min_side)
    matched = _stored_image(match, model.min_side)
    maps = embed_query(model, [query, matched], maps=True).maps
    query_heat, match_heat = agreement(maps[0], maps[1])
    return {"query_heatmap": heatmap_png(query, query_heat, model.preset),
            "match_heatmap": heatmap_png(matched, match_heat, model.preset)}
