from django.contrib import admin
from django.utils.html import format_html

from catalog.models import Category, CategoryPrediction, Product, ProductImage


def thumbnail(image: ProductImage | None, height: int = 80) -> str:
    if image is None or not image.file:
        return "-"
    return format_html('<img src="{}" alt="" style="max-height:{}px;max-width:{}px">', image.file.url, height, height * 2)


@admin.register(Category)
class CategoryAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "parent"]
    list_filter = ["parent"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}


class ProductImageInline(admin.TabularInline):
    model = ProductImage
    extra = 0
    fields = ["preview", "status", "error", "width", "height", "model_identity"]
    readonly_fields = fields
    can_delete = True
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False  # images arrive through the upload API or an ingest job, which validate them

    @admin.display(description="image")
    def preview(self, image: ProductImage) -> str:
        return thumbnail(image, 120)


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["preview", "sku", "title", "category", "price", "currency", "is_active", "updated_at"]
    list_display_links = ["preview", "sku"]
    list_filter = ["is_active", "category", "images__status"]
    search_fields = ["sku", "title"]
    autocomplete_fields = ["category"]
    inlines = [ProductImageInline]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("category").prefetch_related("images").distinct()

    @admin.display(description="image")
    def preview(self, product: Product) -> str:
        images = list(product.images.all())
        return thumbnail(images[0] if images else None, 60)


@admin.register(ProductImage)
class ProductImageAdmin(admin.ModelAdmin):
    list_display = ["preview", "id", "product", "status", "model_identity", "created_at"]
    list_filter = ["status", "product__category", "model_identity"]
    search_fields = ["product__sku", "product__title", "sha256"]
    readonly_fields = ["preview", "sha256", "width", "height", "model_identity", "labels", "error"]
    raw_id_fields = ["product"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="image")
    def preview(self, image: ProductImage) -> str:
        return thumbnail(image)


@admin.register(CategoryPrediction)
class CategoryPredictionAdmin(admin.ModelAdmin):
    list_display = ["product", "category", "score", "status", "head_version", "created_at"]
    list_filter = ["status", "category", "head_version"]
    search_fields = ["product__sku", "product__title"]
    raw_id_fields = ["product"]
