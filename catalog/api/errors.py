"""Every API error is JSON: {"error": one readable sentence, "fields": {...} for invalid input}."""
import logging

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import InterfaceError, OperationalError
from django.http import JsonResponse
from rest_framework import exceptions
from rest_framework.serializers import as_serializer_error
from rest_framework.views import exception_handler as drf_exception_handler

from catalog.queue import QueueUnavailable

logger = logging.getLogger(__name__)

DATABASE_UNAVAILABLE = "the database is unavailable right now; try again in a minute"


def _flatten(data, prefix: str = "") -> list[str]:
    if isinstance(data, dict):
        out = []
        for key, value in data.items():
            label = "" if key in ("non_field_errors", "detail") else str(key)
            out += _flatten(value, f"{prefix}.{label}".strip(".") if label else prefix)
        return out
    if isinstance(data, list):
        return [msg for item in data for msg in _flatten(item, prefix)]
    return [f"{prefix}: {data}" if prefix else str(data)]


class ServiceUnavailable(exceptions.APIException):
    status_code = 503
    default_detail = "the service is temporarily unavailable; try again shortly"


def exception_handler(exc, context):
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(detail=as_serializer_error(exc))
    if isinstance(exc, QueueUnavailable):
        exc = ServiceUnavailable(detail=str(exc))
    if isinstance(exc, (OperationalError, InterfaceError)):
        # The connection failed (the server restarts, the network dropped); a later request reconnects.
        logger.warning("database unavailable: %s", str(exc).strip())
        exc = ServiceUnavailable(detail=DATABASE_UNAVAILABLE)
    if isinstance(exc, exceptions.UnsupportedMediaType) and context.get("view") is not None:
        accepted = ", ".join(parser.media_type for parser in context["view"].get_parsers())
        exc = exceptions.UnsupportedMediaType(
            context["request"].content_type, detail=f"{exc.detail} This endpoint accepts: {accepted}."
        )
    response = drf_exception_handler(exc, context)
    if isinstance(exc, ServiceUnavailable) and response is not None:
        response["Retry-After"] = "30"
    if response is None:
        return None
    data = response.data
    if isinstance(data, dict) and set(data) == {"detail"}:
        response.data = {"error": str(data["detail"])}
    else:
        response.data = {"error": "; ".join(_flatten(data)) or "invalid input", "fields": data}
    return response


def json_not_found(request, exception=None):
    return JsonResponse({"error": f"nothing at {request.path}"}, status=404)


def json_server_error(request):
    return JsonResponse({"error": "internal error; the failure was logged"}, status=500)
