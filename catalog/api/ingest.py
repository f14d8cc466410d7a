"""Bulk ingest jobs: POST a manifest (and a ZIP of images), then follow the job until it finishes."""
from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import generics, serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog.api.filters import IngestJobFilter
from catalog.api.permissions import IsStaff
from catalog.api.schema import ERROR, UNAVAILABLE
from catalog.ingest import ingest_job_create, ingest_job_current, ingest_job_errors
from catalog.ingest_report import ingest_job_report
from catalog.manifest import COLUMNS
from catalog.models import IngestJob


class IngestJobInput(serializers.Serializer):
    manifest = serializers.FileField(
        help_text=f"CSV with the header {','.join(COLUMNS)} (sku, title and image required), or JSON Lines "
                  "with the same fields. `image` is a path inside the archive or an http(s) URL; `category` "
                  "a slash path such as food/fruit.",
    )
    archive = serializers.FileField(required=False, help_text="A ZIP of the images the manifest names.")


class IngestJobAccepted(serializers.ModelSerializer):
    class Meta:
        model = IngestJob
        fields = ["id", "status"]


class IngestJobError(serializers.Serializer):
    row = serializers.IntegerField(
        allow_null=True, help_text="The row's line in the manifest (the CSV header is line 1); null for the job's own."
    )
    sku = serializers.CharField(allow_null=True)
    error = serializers.CharField()


class IngestJobListItem(serializers.ModelSerializer):
    images_per_s = serializers.FloatField(read_only=True, allow_null=True,
                                          help_text="new images indexed per second, from the first to the latest")
    seconds_to_first_image = serializers.FloatField(read_only=True, allow_null=True,
                                                    help_text="from the start to the first new image indexed "
                                                              "(a worker loading its model is here)")

    class Meta:
        model = IngestJob
        fields = ["id", "status", "manifest_name", "total", "processed", "succeeded", "failed", "images_new",
                  "images_already", "created_at", "started_at", "finished_at", "images_per_s",
                  "seconds_to_first_image"]


class IngestJobOutput(IngestJobListItem):
    errors = serializers.SerializerMethodField()

    class Meta(IngestJobListItem.Meta):
        fields = [name for name in IngestJobListItem.Meta.fields if name != "created_at"] + ["errors"]

    @extend_schema_field(IngestJobError(many=True))
    def get_errors(self, job: IngestJob) -> list[dict]:
        return ingest_job_errors(job=job)


class IngestJobCreateApi(generics.ListAPIView):
    """GET: every ingest job, newest first (paginated, `status` filter); POST: a new one."""

    permission_classes = [IsStaff]
    parser_classes = [MultiPartParser]
    serializer_class = IngestJobListItem
    filterset_class = IngestJobFilter
    queryset = IngestJob.objects.order_by("-id")

    @extend_schema(
        request={"multipart/form-data": IngestJobInput},
        responses={202: IngestJobAccepted, 400: ERROR, 503: UNAVAILABLE},
        description="Queue a bulk import. A manifest without the required columns, one that is not UTF-8, or an "
                    "unsafe archive is a 400 and nothing is stored; a bad row only marks that row.",
    )
    def post(self, request):
        data = IngestJobInput(data=request.data)
        data.is_valid(raise_exception=True)
        job = ingest_job_create(
            manifest=data.validated_data["manifest"], archive=data.validated_data.get("archive"),
            created_by=request.user,
        )
        response = Response(IngestJobAccepted(job).data, status=status.HTTP_202_ACCEPTED)
        response["Location"] = request.build_absolute_uri(f"{job.pk}/")
        return response


class IngestJobDetailApi(APIView):
    permission_classes = [IsStaff]

    @extend_schema(
        responses=IngestJobOutput,
        description="The job's progress, current to the second while it runs; errors lists the failed rows "
                    "(the first 1000).",
    )
    def get(self, request, pk: int):
        job = ingest_job_current(job=get_object_or_404(IngestJob, pk=pk))
        return Response(IngestJobOutput(job).data)


class IngestJobReportApi(APIView):
    permission_classes = [IsStaff]

    def perform_content_negotiation(self, request, force=False):
        # The report is CSV whatever the Accept header asks for; errors stay JSON.
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(
        responses={(200, "text/csv"): OpenApiTypes.STR},
        description="Every row of the job as CSV (UTF-8 with a byte-order mark): line, status (succeeded, failed, "
                    "pending), error, warning (its image looks like another product's), then the manifest's columns, to fix the failed rows and upload them again. "
                    "Cells that a spreadsheet would run as a formula start with a quote.",
    )
    def get(self, request, pk: int):
        job = ingest_job_current(job=get_object_or_404(IngestJob, pk=pk))
        response = StreamingHttpResponse(ingest_job_report(job=job), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="ingest-job-{job.pk}.csv"'
        return response
