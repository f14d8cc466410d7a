"""GET /api/health/: 200 while the database and the task queue answer, 503 saying which does not."""
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog.health import OK, dependencies_check


class HealthChecks(serializers.Serializer):
    database = serializers.CharField(help_text='"ok" or "unavailable"')
    queue = serializers.CharField(help_text='"ok" or "unavailable": the Celery broker (always ok when tasks run in-process)')


class HealthOutput(serializers.Serializer):
    status = serializers.CharField(help_text="ok")
    checks = HealthChecks()


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
            return Response({"status": OK, "checks": checks})
        error = f"the {' and the '.join(down)} {'is' if len(down) == 1 else 'are'} unavailable; try again in a minute"
        return Response({"error": error, "checks": checks}, status=503, headers={"Retry-After": "30"})
