from django.contrib import admin
from django.utils.html import format_html, format_html_join

from catalog.ingest import ingest_job_current, ingest_job_errors
from catalog.models import Category, CategoryPrediction, IngestJob, Product, ProductImage


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


@admin.register(IngestJob)
class IngestJobAdmin(admin.ModelAdmin):
    """Jobs arrive through POST /api/ingest-jobs/ or `manage.py ingest`; here they are followed."""

    list_display = ["id", "status", "progress", "total", "succeeded", "failed", "images_per_s", "created_by",
                    "created_at", "finished_at"]
    list_filter = ["status"]
    fields = ["status", "progress", "total", "processed", "succeeded", "failed", "images_per_s", "manifest",
              "archive", "created_by", "created_at", "started_at", "finished_at", "error_list"]
    readonly_fields = fields

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def get_object(self, request, object_id, from_field=None):
        job = super().get_object(request, object_id, from_field)
        return ingest_job_current(job=job) if job is not None else None

    @admin.display(description="progress")
    def progress(self, job: IngestJob) -> str:
        percent = round(100 * job.processed / job.total) if job.total else (100 if job.is_finished else 0)
        colour = {"failed": "#ba2121", "completed_with_errors": "#c77c02"}.get(job.status, "#417690")
        return format_html(
            '<div title="{} of {} rows" style="width:160px;background:#e8e8e8;border-radius:3px">'
            '<div class="ingest-progress" style="width:{}%;background:{};height:12px;border-radius:3px"></div>'
            "</div>{}%",
            job.processed, job.total, percent, colour, percent,
        )

    @admin.display(description="errors")
    def error_list(self, job: IngestJob) -> str:
        errors = ingest_job_errors(job=job, limit=200)
        lines = [f"row {e['row']} ({e['sku']}): {e['error']}" if e["row"] is not None else e["error"] for e in errors]
        return format_html_join("", "<div>{}</div>", ((line,) for line in lines)) if lines else "-"
