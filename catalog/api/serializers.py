"""Explicit input and output serializers. Input serializers validate shape; services validate meaning."""
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from catalog.models import Category, CategoryPrediction, Product, ProductImage, validate_attributes


class CategoryOutput(serializers.ModelSerializer):
    path = serializers.CharField(read_only=True)

    class Meta:
        model = Category
        fields = ["id", "name", "slug", "parent", "path"]


class CategoryInput(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    slug = serializers.SlugField(max_length=200, required=False)
    parent = serializers.PrimaryKeyRelatedField(queryset=Category.objects.all(), allow_null=True, required=False)


class CategoryDeleteQuery(serializers.Serializer):
    move_to = serializers.PrimaryKeyRelatedField(
        queryset=Category.objects.all(), required=False,
        help_text="the id of the category that takes the deleted one's products and subcategories",
        error_messages={"does_not_exist": "no category with id {pk_value} to move them to",
                        "incorrect_type": "move_to must be a category id, not {data_type}"},
    )


class CategoryBrief(serializers.ModelSerializer):
    path = serializers.CharField(read_only=True)

    class Meta:
        model = Category
        fields = ["id", "name", "slug", "path"]


class ImageBrief(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()

    class Meta:
        model = ProductImage
        fields = ["id", "url", "status"]

    def get_url(self, image: ProductImage) -> str:
        request = self.context.get("request")
        url = image.file.url
        return request.build_absolute_uri(url) if request else url


class ImageOutput(ImageBrief):
    class Meta:
        model = ProductImage
        fields = [
            "id", "product", "url", "status", "error", "sha256", "width", "height",
            "model_identity", "labels", "created_at", "updated_at",
        ]


class ImageUploadInput(serializers.Serializer):
    image = serializers.FileField(help_text="The image file (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC or AVIF).")


class SuggestionOutput(serializers.ModelSerializer):
    category = CategoryBrief(read_only=True)

    class Meta:
        model = CategoryPrediction
        fields = ["category", "score", "status", "head_version"]


class ProductOutput(serializers.ModelSerializer):
    category_path = serializers.SerializerMethodField()
    images = ImageBrief(many=True, read_only=True)
    suggestions = serializers.SerializerMethodField()

    class Meta:
        model = Product
        fields = [
            "id", "sku", "title", "description", "price", "currency", "category", "category_path",
            "attributes", "is_active", "images", "suggestions", "created_at", "updated_at",
        ]

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_category_path(self, product: Product) -> str | None:
        return product.category.path if product.category else None

    @staticmethod
    def _suggested(product: Product) -> list[CategoryPrediction]:
        predictions = [p for p in product.predictions.all() if p.status == CategoryPrediction.Status.SUGGESTED]
        return sorted(predictions, key=lambda p: -p.score)

    @extend_schema_field(SuggestionOutput(many=True))
    def get_suggestions(self, product: Product) -> list[dict]:
        return SuggestionOutput(self._suggested(product), many=True).data


class ProductInput(serializers.Serializer):
    sku = serializers.CharField(max_length=64)
    title = serializers.CharField(max_length=300)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    price = serializers.DecimalField(max_digits=12, decimal_places=2, min_value=0, required=False, allow_null=True)
    currency = serializers.RegexField(r"^[A-Za-z]{3}$", required=False, help_text="ISO 4217 code, e.g. USD")
    category = serializers.PrimaryKeyRelatedField(queryset=Category.objects.all(), allow_null=True, required=False)
    attributes = serializers.JSONField(required=False, default=dict, validators=[validate_attributes])
    is_active = serializers.BooleanField(required=False, default=True)


