"""POST /api/search/: similar products for a photo, an image URL, or a catalog product."""
from django.conf import settings
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog.api.schema import ERROR
from catalog.api.serializers import CategoryBrief
from catalog.api.throttling import ScopedRateThrottleFailOpen
from catalog.explain import explain_match
from catalog.models import Category, Product
from catalog.remote import FetchError, fetch_url
from catalog.search import search_catalog


@extend_schema_field({"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 4,
                      "maxItems": 4, "example": [0.1, 0.2, 0.6, 0.9]})
class BoxField(serializers.Field):
    """[x0, y0, x1, y1] in fractions of the query image: a JSON list, or "x0,y0,x1,y1" in a form."""

    default_error_messages = {
        "invalid": "box must be four numbers x0,y0,x1,y1 between 0 and 1, e.g. [0.1, 0.2, 0.6, 0.9]",
        "empty": "box must have x0 < x1 and y0 < y1 and cover at least 2 % of the image's width and height",
    }

    def to_internal_value(self, data):
        if isinstance(data, str):
            data = data.strip().strip("[]").split(",")
        if not isinstance(data, (list, tuple)) or len(data) != 4 or any(isinstance(v, bool) for v in data):
            self.fail("invalid")
        try:
            values = [float(v) for v in data]
        except (TypeError, ValueError):
            self.fail("invalid")
        if not all(0.0 <= v <= 1.0 for v in values):
            self.fail("invalid")
        x0, y0, x1, y1 = values
        if x1 - x0 < 0.02 or y1 - y0 < 0.02:
            self.fail("empty")
        return values

    def to_representation(self, value):
        return value


class SearchInput(serializers.Serializer):
    image = serializers.FileField(required=False, help_text="The photo to search with (multipart).")
    image_url = serializers.URLField(required=False, max_length=2000, help_text="A public http(s) URL of a photo.")
    product = serializers.IntegerField(required=False, help_text="A product id: more like this product.")
    k = serializers.IntegerField(required=False, default=10, min_value=1, max_value=100, error_messages={
        "min_value": "k (how many results) must be at least {min_value}",
        "max_value": "k (how many results) must be at most {max_value}",
        "invalid": "k (how many results) must be a whole number",
    })
    category = serializers.PrimaryKeyRelatedField(
        queryset=Category.objects.all(), required=False, allow_null=True,
        help_text="Only this category and its subcategories.",
        error_messages={"does_not_exist": "no category with id {pk_value}",
                        "incorrect_type": "category must be a category id, not {data_type}"},
    )
    min_price = serializers.DecimalField(max_digits=12, decimal_places=2, min_value=0, required=False, allow_null=True)
    max_price = serializers.DecimalField(max_digits=12, decimal_places=2, min_value=0, required=False, allow_null=True)
    box = BoxField(required=False, allow_null=True, help_text="Search this region of the photo only: [x0, y0, x1, "
                   "y1] in fractions of its width and height (JSON), or \"x0,y0,x1,y1\" (multipart).")

    def validate(self, data):
        given = [name for name in ("image", "image_url", "product") if data.get(name) not in (None, "")]
        if len(given) != 1:
            raise serializers.ValidationError(
                "give exactly one of: an `image` file (multipart), an `image_url`, or a `product` id"
                + (f" (got {', '.join(given)})" if given else "")
            )
        low, high = data.get("min_price"), data.get("max_price")
        if low is not None and high is not None and low > high:
            raise serializers.ValidationError({"min_price": "min_price is above max_price"})
        if data.get("box") is not None and data.get("product") is not None:
            raise serializers.ValidationError({"box": "a box is a region of a photo; \"more like this\" has none"})
        return data


class SearchJsonInput(SearchInput):
    image = None  # a file can only be sent as multipart


def query_photo(query: dict) -> bytes | None:
    """The bytes of the query's photo: the uploaded file or the fetched URL (None: a product query)."""
    if query.get("image") is not None:
        upload = query["image"]
        if upload.size > settings.MAX_UPLOAD_BYTES:
            raise serializers.ValidationError(
                {"image": f"the file is {upload.size / 1e6:.1f} MB, over the {settings.MAX_UPLOAD_BYTES / 1e6:.1f} MB limit"}
            )
        return upload.read()
    if query.get("image_url"):
        try:
            return fetch_url(query["image_url"]).data
        except FetchError as exc:
            raise serializers.ValidationError({"image_url": str(exc)}) from None
    return None


class SearchProduct(serializers.ModelSerializer):
    category = CategoryBrief(read_only=True)
    image_url = serializers.SerializerMethodField()

    class Meta:
        model = Product
        fields = ["id", "sku", "title", "price", "currency", "category", "image_url"]

    def get_image_url(self, product) -> str | None:
        image = self.context["images"].get(product.pk)
        return self.context["request"].build_absolute_uri(image.file.url) if image else None


class SearchHit(serializers.Serializer):
    product = serializers.DictField()
    image = serializers.IntegerField()
    score = serializers.FloatField(help_text="cosine similarity, for programs; the page shows `match`")
    match = serializers.ChoiceField(
        choices=["same_product", "similar", "weak"],
        help_text="same_product: right at least 95 % of the time on this catalog's own evaluation; weak: less "
                  "likely related (same product or category) than not. All similar before the model is evaluated.",
    )


class FoundObject(serializers.Serializer):
    box = serializers.ListField(child=serializers.FloatField(), help_text="[x0, y0, x1, y1], fractions of the photo")
    score = serializers.FloatField(help_text="how strongly the model's features respond to it, 0..1")


class SearchOutput(serializers.Serializer):
    results = SearchHit(many=True)
    objects = FoundObject(many=True, help_text="distinct objects of the photo, strongest first (none for a product)")
    predicted_categories = serializers.ListField(child=serializers.DictField())
    labels = serializers.ListField(child=serializers.DictField())
    took_ms = serializers.IntegerField()


class SearchApi(APIView):
    permission_classes = [AllowAny]
    parser_classes = [JSONParser, MultiPartParser, FormParser]
    throttle_classes = [ScopedRateThrottleFailOpen]
    throttle_scope = "search"

    @extend_schema(
        request={"multipart/form-data": SearchInput, "application/json": SearchJsonInput},
        responses={200: SearchOutput, 400: ERROR},
        description="The most similar catalog products, one per product, best first. The query image is not stored.",
    )
    def post(self, request):
        data = SearchInput(data=request.data)
        data.is_valid(raise_exception=True)
        query = data.validated_data
        category = query.get("category")
        result = search_catalog(
            image_data=query_photo(query), product_id=query.get("product"), k=query["k"],
            category_id=category.pk if category else None,
            min_price=query.get("min_price"), max_price=query.get("max_price"), box=query.get("box"),
        )
        images = {}
        for hit in result.hits:
            images[hit.product.pk] = next((i for i in hit.product.images.all() if i.pk == hit.image_id), None)
        context = {"request": request, "images": images}
        return Response({
            "results": [
                {"product": SearchProduct(hit.product, context=context).data, "image": hit.image_id,
                 "score": round(hit.score, 4), "match": match}
                for hit, match in zip(result.hits, result.matches)
            ],
            "objects": [{"box": found.as_list(), "score": round(found.score, 4)} for found in result.objects],
            "predicted_categories": [
                {"category": CategoryBrief(c).data, "score": round(score, 4)}
                for c, score in result.predicted_categories
            ],
            "labels": [{"label": label, "score": round(float(score), 4)} for label, score in result.labels],
            "took_ms": result.took_ms,
        })


class ExplainInput(SearchInput):
    image_id = serializers.IntegerField(help_text="The catalog image of a result (its `image`).")
    k = None
    category = None
    min_price = None
    max_price = None


class ExplainJsonInput(ExplainInput):
    image = None


class ExplainOutput(serializers.Serializer):
    query_heatmap = serializers.CharField(help_text="PNG data URL: the query photo, hot where it agrees")
    match_heatmap = serializers.CharField(help_text="PNG data URL: the catalog image, hot where it agrees")


class ExplainApi(APIView):
    permission_classes = [AllowAny]
    parser_classes = [JSONParser, MultiPartParser, FormParser]
    throttle_classes = [ScopedRateThrottleFailOpen]
    throttle_scope = "search"

    @extend_schema(
        request={"multipart/form-data": ExplainInput, "application/json": ExplainJsonInput},
        responses={200: ExplainOutput, 400: ERROR},
        description="Why a result matched: the query (a photo, an image URL, or a product) and a catalog image, "
                    "each with a heat map of the regions where they agree (the backbone's spatial features).",
    )
    def post(self, request):
        data = ExplainInput(data=request.data)
        data.is_valid(raise_exception=True)
        query = data.validated_data
        return Response(explain_match(image_id=query["image_id"], image_data=query_photo(query),
                                      product_id=query.get("product"), box=query.get("box")))
