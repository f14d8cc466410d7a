"""The admin: catalog tables, the suggestion review queue, categorizer reports and ingest jobs."""
from pathlib import Path

from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from catalog import categorizer, suggestions
from catalog.ingest import ingest_job_current, ingest_job_errors
from catalog.models import (
    CategorizerVersion,
    Category,
    CategoryPrediction,
    IngestJob,
    Product,
    ProductImage,
)
from catalog.reports import CATEGORIZER_REPORT_FILES


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


class UnlikelyCategoryFilter(admin.SimpleListFilter):
    """The catalog integrity check: products the category head finds unlikely to be in their category."""

    title = "category looks unlikely"
    parameter_name = "unlikely_category"

    def lookups(self, request, model_admin):
        return [("yes", f"Yes (under {categorizer.UNLIKELY_THRESHOLD:.0%})")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(pk__in=list(categorizer.products_with_unlikely_category()))
        return queryset


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["preview", "sku", "title", "category", "price", "currency", "is_active", "updated_at"]
    list_display_links = ["preview", "sku"]
    list_filter = ["is_active", "category", "images__status", UnlikelyCategoryFilter]
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
    # The file is read-only: a replacement here would skip the upload's checks and leave sha256 and the
    # vector describing the old bytes; upload a new image through the API instead.
    readonly_fields = ["preview", "file", "sha256", "width", "height", "model_identity", "labels", "error"]
    raw_id_fields = ["product"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="image")
    def preview(self, image: ProductImage) -> str:
        return thumbnail(image)


@admin.register(CategoryPrediction)
class CategoryPredictionAdmin(admin.ModelAdmin):
    """The review queue of category suggestions: accept (assigns the category) or reject, in bulk."""

    list_display = ["preview", "product", "category", "score", "status", "head_version", "created_at"]
    list_display_links = ["product"]
    list_filter = ["status", "category", "head_version"]
    search_fields = ["product__sku", "product__title"]
    raw_id_fields = ["product"]
    actions = ["accept", "reject"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("product", "category__parent").prefetch_related(
            "product__images"
        )

    @admin.display(description="image")
    def preview(self, prediction: CategoryPrediction) -> str:
        images = list(prediction.product.images.all())
        return thumbnail(images[0] if images else None, 60)

    @admin.action(description="Accept: give the products these categories")
    def accept(self, request, queryset):
        count = suggestions.suggestions_accept(prediction_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{count} product{'s' if count != 1 else ''} got the suggested category.")

    @admin.action(description="Reject: never suggest these categories for these products again")
    def reject(self, request, queryset):
        count = suggestions.suggestions_reject(prediction_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{count} suggestion{'s' if count != 1 else ''} rejected.")

    def changelist_view(self, request, extra_context=None):
        report = categorizer.categorizer_latest_report()
        extra_context = {**(extra_context or {}), "categorizer_report_url": _report_url(report) if report else None}
        return super().changelist_view(request, extra_context)


def _report_url(version: CategorizerVersion) -> str:
    return reverse("admin:catalog_categorizerversion_report", args=[version.pk])


@admin.register(CategorizerVersion)
class CategorizerVersionAdmin(admin.ModelAdmin):
    """Trainings arrive through POST /api/categorizer/train/ or `manage.py train_categorizer`; here they are read."""

    list_display = ["id", "status", "version", "model_identity", "n_train", "top1", "top5", "trained_at", "report"]
    list_filter = ["status", "model_identity"]
    fields = ["status", "error", "version", "model_identity", "n_train", "n_test", "top1", "top5", "created_by",
              "created_at", "trained_at", "report", "report_at"]
    readonly_fields = fields

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="top-1")
    def top1(self, version: CategorizerVersion):
        return version.metrics.get("top1")

    @admin.display(description="top-5")
    def top5(self, version: CategorizerVersion):
        return version.metrics.get("top5")

    @admin.display(description="evaluation report")
    def report(self, version: CategorizerVersion) -> str:
        return format_html('<a href="{}">report</a>', _report_url(version)) if version.report_file else "-"

    def get_urls(self):
        view = self.admin_site.admin_view(self.report_view)
        return [
            path("<int:pk>/report/", view, name="catalog_categorizerversion_report"),
            path("<int:pk>/report/<str:name>", view, name="catalog_categorizerversion_report_file"),
        ] + super().get_urls()

    def report_view(self, request, pk: int, name: str = "index.html"):
        """A file of a version's report; only the report's own file names, so nothing else can be read."""
        version = get_object_or_404(CategorizerVersion, pk=pk)
        if not self.has_view_permission(request, version):
            raise PermissionDenied
        if name not in CATEGORIZER_REPORT_FILES:
            raise Http404("no such report file")
        file = Path(settings.REPORTS_DIR) / Path(version.report_file).parent / name
        if not version.report_file or not file.is_file():
            raise Http404("this version has no report yet; run manage.py evaluate_categorizer")
        return FileResponse(open(file, "rb"), content_type="text/html" if name.endswith(".html") else "image/png")


@admin.register(IngestJob)
class IngestJobAdmin(admin.ModelAdmin):
    """Jobs arrive through POST /api/ingest-jobs/ or `manage.py ingest`; here they are followed."""

    list_display = ["id", "status", "progress", "total", "succeeded", "failed", "images_per_s", "created_by",
                    "created_at", "finished_at"]
    list_filter = ["status"]
    fields = ["status", "progress", "total", "processed", "succeeded", "failed", "images_per_s", "manifest",
              "archive", "created_by", "created_at", "started_at", "finished_at", "report", "error_list"]
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

    @admin.display(description="row report")
    def report(self, job: IngestJob) -> str:
        return format_html('<a href="{}">every row, with its error (CSV)</a>', reverse("ingest-job-report", args=[job.pk]))

    @admin.display(description="errors")
    def error_list(self, job: IngestJob) -> str:
        errors = ingest_job_errors(job=job, limit=200)
        lines = [f"row {e['row']} ({e['sku']}): {e['error']}" if e["row"] is not None else e["error"] for e in errors]
        return format_html_join("", "<div>{}</div>", ((line,) for line in lines)) if lines else "-"
