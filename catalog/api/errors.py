"""Every API error is JSON: {"error": one readable sentence, "fields": {name: [messages]} for invalid input}."""
import logging
import re

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import InterfaceError, OperationalError
from django.http import JsonResponse
from rest_framework import exceptions
from rest_framework.serializers import as_serializer_error
from rest_framework.views import exception_handler as drf_exception_handler

from catalog.queue import QueueUnavailable

logger = logging.getLogger(__name__)

DATABASE_UNAVAILABLE = "the database is unavailable right now; try again in a minute"


def _messages(data) -> list[str]:
    """Every message in an error detail, in order, as plain strings."""
    if isinstance(data, dict):
        return [message for value in data.values() for message in _messages(value)]
    if isinstance(data, (list, tuple)):
        return [message for item in data for message in _messages(item)]
    return [str(data)]


def _sentence(fields: dict[str, list[str]]) -> str:
    """One sentence for people: each message as written, never behind a field prefix; a message that does not
    name its field says which one at its end, in brackets."""
    parts = []
    for name, messages in fields.items():
        for message in messages:
            named = name in ("non_field_errors", "detail") or re.search(
                rf"\b{re.escape(name.replace('_', ' '))}|\b{re.escape(name)}\b", message, re.IGNORECASE)
            parts.append(message if named else f"{message.rstrip('.')} ({name})")
    return "; ".join(parts) or "invalid input"


def _fields(data) -> dict[str, list[str]]:
    """{field: [messages]}: always a list of strings per field, whatever shape DRF or a service gave."""
    if not isinstance(data, dict):
        return {"non_field_errors": _messages(data)}
    return {str(name): _messages(value) for name, value in data.items()}


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
        fields = _fields(data)
        response.data = {"error": _sentence(fields), "fields": fields}
    return response


def json_not_found(request, exception=None):
    return JsonResponse({"error": f"nothing at {request.path}"}, status=404)


def json_server_error(request):
    return JsonResponse({"error": "internal error; the failure was logged"}, status=500)
