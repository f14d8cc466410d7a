"""POST /api/search/: similar products for a photo, an image URL, or a catalog product."""
from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog.api.schema import ERROR
from catalog.api.serializers import CategoryBrief
from catalog.api.throttling import ScopedRateThrottleFailOpen
from catalog.models import Category, Product
from catalog.remote import FetchError, fetch_url
from catalog.search import search_catalog


class SearchInput(serializers.Serializer):
    image = serializers.FileField(required=False, help_text="The photo to search with (multipart).")
    image_url = serializers.URLField(required=False, max_length=2000, help_text="A public http(s) URL of a photo.")
    product = serializers.IntegerField(required=False, help_text="A product id: more like this product.")
    k = serializers.IntegerField(required=False, default=10, min_value=1, max_value=100)
    category = serializers.PrimaryKeyRelatedField(
        queryset=Category.objects.all(), required=False, allow_null=True,
        help_text="Only this category and its subcategories.",
    )
    min_price = serializers.DecimalField(max_digits=12, decimal_places=2, min_value=0, required=False, allow_null=True)
    max_price = serializers.DecimalField(max_digits=12, decimal_places=2, min_value=0, required=False, allow_null=True)

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
        return data


class SearchJsonInput(SearchInput):
    image = None  # a file can only be sent as multipart


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
    score = serializers.FloatField()


class SearchOutput(serializers.Serializer):
    results = SearchHit(many=True)
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
        image_data = None
        if query.get("image") is not None:
            upload = query["image"]
            if upload.size > settings.MAX_UPLOAD_BYTES:
                raise serializers.ValidationError(
                    {"image": f"the file is {upload.size / 1e6:.1f} MB, over the {settings.MAX_UPLOAD_BYTES / 1e6:.1f} MB limit"}
                )
            image_data = upload.read()
        elif query.get("image_url"):
            try:
                image_data = fetch_url(query["image_url"]).data
            except FetchError as exc:
                raise serializers.ValidationError({"image_url": str(exc)}) from None
        category = query.get("category")
        result = search_catalog(
            image_data=image_data, product_id=query.get("product"), k=query["k"],
            category_id=category.pk if category else None,
            min_price=query.get("min_price"), max_price=query.get("max_price"),
        )
        images = {}
        for hit in result.hits:
            images[hit.product.pk] = next((i for i in hit.product.images.all() if i.pk == hit.image_id), None)
        context = {"request": request, "images": images}
        return Response({
            "results": [
                {"product": SearchProduct(hit.product, context=context).data, "image": hit.image_id,
                 "score": round(hit.score, 4)}
                for hit in result.hits
            ],
            "predicted_categories": [
                {"category": CategoryBrief(c).data, "score": round(score, 4)}
                for c, score in result.predicted_categories
            ],
            "labels": [{"label": label, "score": round(float(score), 4)} for label, score in result.labels],
            "took_ms": result.took_ms,
        })
