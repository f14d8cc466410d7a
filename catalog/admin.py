"""The admin: catalog tables, the suggestion review queue, models, evaluation reports and ingest jobs."""
from pathlib import Path

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from catalog import categorizer, duplicates, model_versions, pipeline, suggestions
from catalog.ingest import ingest_job_create, ingest_job_current, ingest_job_errors
from catalog.manifest import COLUMNS
from catalog.models import (
    CategorizerVersion,
    Category,
    CategoryPrediction,
    DuplicatePair,
    IngestJob,
    ModelVersion,
    Product,
    ProductImage,
)
from catalog.queue import QueueUnavailable
from catalog.reports import CATEGORIZER_REPORT_FILES, EVALUATION_REPORT_FILES


def thumbnail(image: ProductImage | None, height: int = 80) -> str:
    if image is None or not image.file:
        return "-"
    return format_html('<img src="{}" alt="" style="max-height:{}px;max-width:{}px">', image.file.url, height, height * 2)


class ReportsAdmin(admin.ModelAdmin):
    """An admin whose rows have an HTML report (``report_file``, under settings.REPORTS_DIR) with its plots."""

    report_files: tuple[str, ...] = ()
    no_report_hint = ""

    def get_urls(self):
        view = self.admin_site.admin_view(self.report_view)
        name = f"{self.model._meta.app_label}_{self.model._meta.model_name}"
        return [
            path("<int:pk>/report/", view, name=f"{name}_report"),
            path("<int:pk>/report/<str:file>", view, name=f"{name}_report_file"),
        ] + super().get_urls()

    def report_view(self, request, pk: int, file: str = "index.html"):
        """A file of a row's report; only the report's own file names, so nothing else can be read."""
        row = get_object_or_404(self.model, pk=pk)
        if not self.has_view_permission(request, row):
            raise PermissionDenied
        if file not in self.report_files:
            raise Http404("no such report file")
        path_on_disk = Path(settings.REPORTS_DIR) / Path(row.report_file).parent / file
        if not row.report_file or not path_on_disk.is_file():
            raise Http404(f"there is no report yet; {self.no_report_hint}")
        return FileResponse(open(path_on_disk, "rb"),
                            content_type="text/html" if file.endswith(".html") else "image/png")

    @admin.display(description="evaluation report")
    def report(self, row) -> str:
        if not row.report_file:
            return "-"
        name = f"admin:{self.model._meta.app_label}_{self.model._meta.model_name}_report"
        return format_html('<a href="{}">report</a>', reverse(name, args=[row.pk]))


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
        weakness = categorizer.integrity_check_weakness()
        if weakness is not None:  # say so, rather than list what a weak head happens to doubt
            return [("not-judged", f"Not judged: {weakness}")]
        return [("yes", f"Yes (under {categorizer.UNLIKELY_THRESHOLD:.0%})")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(pk__in=list(categorizer.products_with_unlikely_category()))
        if self.value() == "not-judged":
            return queryset.none()
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
    list_display = ["preview", "id", "product", "status", "short_error", "model_identity", "created_at"]
    list_filter = ["status", "product__category", "model_identity"]
    search_fields = ["product__sku", "product__title", "sha256"]
    # The file is read-only: a replacement here would skip the upload's checks and leave sha256 and the
    # vector describing the old bytes; upload a new image through the API instead.
    readonly_fields = ["preview", "file", "sha256", "width", "height", "model_identity", "labels", "error"]
    raw_id_fields = ["product"]
    actions = ["retry"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="image")
    def preview(self, image: ProductImage) -> str:
        return thumbnail(image)

    @admin.display(description="error")
    def short_error(self, image: ProductImage) -> str:
        return image.error[:120] + ("…" if len(image.error) > 120 else "")

    @admin.action(description="Queue the failed ones for embedding again")
    def retry(self, request, queryset):
        count = pipeline.images_retry_failed(image_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{count} failed image{'s' if count != 1 else ''} queued again.")


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
class CategorizerVersionAdmin(ReportsAdmin):
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

    report_files = CATEGORIZER_REPORT_FILES
    no_report_hint = "run manage.py evaluate_categorizer"


class IngestUploadForm(forms.Form):
    manifest = forms.FileField(help_text="CSV (or JSON Lines) with the columns sku, title, image (required), "
                                         "category, price, description")
    archive = forms.FileField(required=False, help_text="a ZIP of the images the manifest names by path")


@admin.register(IngestJob)
class IngestJobAdmin(admin.ModelAdmin):
    """Jobs arrive through POST /api/ingest-jobs/, `manage.py ingest` or the upload form here ("Add"), and are
    followed here."""

    list_display = ["id", "manifest_name", "status", "progress", "total", "succeeded", "failed", "images_per_s",
                    "created_by", "created_at", "finished_at"]
    list_filter = ["status"]
    fields = ["status", "progress", "total", "processed", "succeeded", "failed", "images_per_s", "manifest_name",
              "manifest", "archive", "created_by", "created_at", "started_at", "finished_at", "report", "error_list"]
    readonly_fields = fields

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def get_object(self, request, object_id, from_field=None):
        job = super().get_object(request, object_id, from_field)
        return ingest_job_current(job=job) if job is not None else None

    def add_view(self, request, form_url="", extra_context=None):
        """The upload form: a manifest and an optional ZIP of images become a queued job, as through the API."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = IngestUploadForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            try:
                job = ingest_job_create(manifest=form.cleaned_data["manifest"],
                                        archive=form.cleaned_data.get("archive"), created_by=request.user)
            except ValidationError as exc:
                form.add_error(None, " ".join(exc.messages))
            except QueueUnavailable as exc:
                form.add_error(None, str(exc))
            else:
                self.message_user(request, f"ingest job {job.pk} queued: its progress shows here as it runs")
                return redirect(reverse("admin:catalog_ingestjob_change", args=[job.pk]))
        context = {**self.admin_site.each_context(request), "opts": self.model._meta, "form": form,
                   "title": "Upload a manifest", "columns": ", ".join(COLUMNS)}
        return TemplateResponse(request, "admin/catalog/ingestjob/upload.html", context)

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


@admin.register(ModelVersion)
class ModelVersionAdmin(ReportsAdmin):
    """Fine-tunings arrive through POST /api/models/finetune/ or `manage.py finetune`; here they are followed,
    compared, promoted and rolled back."""

    list_display = ["id", "status", "identity", "backbone", "stage", "recall_at_1", "top1", "compared_with",
                    "created_at", "finished_at", "report"]
    list_filter = ["status", "backbone"]
    fields = ["status", "identity", "backbone", "weights", "parent", "epochs", "stage", "recall_at_1", "top1",
              "compared_with", "why", "error", "created_by", "created_at", "finished_at", "report"]
    readonly_fields = fields
    actions = ["promote", "rollback"]
    report_files = EVALUATION_REPORT_FILES
    no_report_hint = "it is written when the model has been evaluated (manage.py evaluate for the serving one)"

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="progress")
    def stage(self, version: ModelVersion) -> str:
        progress = version.progress
        done = f" {progress['done']}/{progress['total']}" if "total" in progress else ""
        return f"{progress.get('stage', version.status)}{done}"

    @admin.display(description="search recall@1")
    def recall_at_1(self, version: ModelVersion):
        return (version.metrics.get("search") or {}).get("recall_at_1")

    @admin.display(description="category top-1")
    def top1(self, version: ModelVersion):
        return (version.metrics.get("categories") or {}).get("top1")

    @admin.display(description="decision")
    def why(self, version: ModelVersion) -> str:
        return version.decision.get("why", "")

    @admin.action(description="Promote: serve this model")
    def promote(self, request, queryset):
        self._each(request, queryset, lambda version: model_versions.model_promote(version=version))

    @admin.action(description="Roll back: serve again the model this serving one replaced")
    def rollback(self, request, queryset):
        self._each(request, queryset, lambda version: model_versions.model_rollback(version=version))

    def _each(self, request, queryset, action) -> None:
        for version in queryset:
            try:
                served = action(version)
                self.message_user(request, f"model {served.pk} now serves")
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), level=messages.ERROR)


@admin.register(DuplicatePair)
class DuplicatePairAdmin(admin.ModelAdmin):
    """Near-duplicates across products, side by side: merge into one product, or say they are not duplicates."""

    list_display = ["first", "first_product", "second", "second_product", "score", "hash_distance", "status",
                    "created_at"]
    list_filter = ["status"]
    search_fields = ["image__product__sku", "other__product__sku"]
    actions = ["merge_into_first", "merge_into_second", "not_duplicates"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("image__product", "other__product")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="image")
    def first(self, pair: DuplicatePair) -> str:
        return thumbnail(pair.image, 90)

    @admin.display(description="product")
    def first_product(self, pair: DuplicatePair) -> str:
        return f"{pair.image.product.sku}: {pair.image.product.title}"

    @admin.display(description="looks like")
    def second(self, pair: DuplicatePair) -> str:
        return thumbnail(pair.other, 90)

    @admin.display(description="product")
    def second_product(self, pair: DuplicatePair) -> str:
        return f"{pair.other.product.sku}: {pair.other.product.title}"

    @admin.action(description="Merge into the first product (move the images, deactivate the second)")
    def merge_into_first(self, request, queryset):
        self._merge(request, queryset, lambda pair: pair.image.product)

    @admin.action(description="Merge into the second product (move the images, deactivate the first)")
    def merge_into_second(self, request, queryset):
        self._merge(request, queryset, lambda pair: pair.other.product)

    @admin.action(description="Not duplicates: never list these pairs again")
    def not_duplicates(self, request, queryset):
        for pair in queryset:
            duplicates.duplicate_dismiss(pair=pair)
        self.message_user(request, f"{queryset.count()} pair(s) will not be listed again.")

    def _merge(self, request, queryset, keep) -> None:
        for pair in queryset.filter(status=DuplicatePair.Status.OPEN):
            try:
                kept = duplicates.duplicate_merge(pair=pair, keep=keep(pair))
                self.message_user(request, f"merged into {kept.sku}")
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), level=messages.ERROR)
