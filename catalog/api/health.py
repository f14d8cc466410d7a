"""GET /api/health/: 200 while the database and the task queue answer, 503 saying which does not."""
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog.health import OK, dependencies_check, index_details


class HealthChecks(serializers.Serializer):
    database = serializers.CharField(help_text='"ok" or "unavailable"')
    queue = serializers.CharField(help_text='"ok" or "unavailable": the Celery broker (always ok when tasks run in-process)')


class IndexDetails(serializers.Serializer):
    identity = serializers.CharField()
    kind = serializers.CharField(help_text="flat (exact) or ivf (approximate)")
    count = serializers.IntegerField(help_text="vectors searched")
    base = serializers.IntegerField(help_text="vectors in the base")
    overlay = serializers.IntegerField(help_text="vectors added since the base, not yet compacted")
    version = serializers.IntegerField(allow_null=True)
    generation = serializers.IntegerField(allow_null=True)
    exhaustive = serializers.BooleanField(help_text="every vector's code is scanned: the approximate stage missed "
                                                    "its recall target")
    nprobe = serializers.IntegerField()
    recall_at_10 = serializers.FloatField(allow_null=True, help_text="measured when the base was built")
    recall_target = serializers.FloatField(allow_null=True)
    note = serializers.CharField(allow_blank=True, help_text="how the index is searched, and why")


class HealthOutput(serializers.Serializer):
    status = serializers.CharField(help_text="ok")
    checks = HealthChecks()
    index = IndexDetails(allow_null=True, help_text="the index search serves; null before one is published")


class HealthDownOutput(serializers.Serializer):
    error = serializers.CharField(help_text="which dependency is down")
    checks = HealthChecks()


class HealthApi(APIView):
    authentication_classes = []  # answers without touching sessions or tokens in the database
    permission_classes = [AllowAny]

    @extend_schema(
        responses={200: HealthOutput, 503: OpenApiResponse(HealthDownOutput, description="a dependency is down")},
        description="For load balancers and monitors: whether this process can reach the database and the task queue.",
    )
    def get(self, request):
        checks = dependencies_check()
        down = [name for name, state in checks.items() if state != OK]
        if not down:
            return Response({"status": OK, "checks": checks, "index": index_details()})
        error = f"the {' and the '.join(down)} {'is' if len(down) == 1 else 'are'} unavailable; try again in a minute"
        return Response({"error": error, "checks": checks}, status=503, headers={"Retry-After": "30"})
