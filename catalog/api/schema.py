"""The OpenAPI schema documents every answer the API can give, errors included.

Errors come from one exception handler (catalog/api/errors.py) and the request body limit, so they are
documented here in one place, from what each view declares (permissions, throttles, parsers, path
parameters), and a new endpoint is documented as honestly as the old ones.
"""
from types import SimpleNamespace

from django.contrib.auth.models import AnonymousUser
from drf_spectacular import openapi
from drf_spectacular.utils import OpenApiResponse
from rest_framework import permissions, serializers


class ApiError(serializers.Serializer):
    error = serializers.CharField(help_text="One readable sentence saying what went wrong.")
    fields = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()), required=False,
        help_text="Invalid input only: the messages for each field (always a list), by field name.",
    )


ERROR = OpenApiResponse(ApiError, description="Invalid input: nothing was changed.")
UNAVAILABLE = OpenApiResponse(
    ApiError, description="The task queue is down: nothing was stored; try again after Retry-After seconds."
)

RETRY_AFTER = {
    "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before trying again."},
}


class AutoSchema(openapi.AutoSchema):
    def _anonymous_allowed(self) -> bool:
        request = SimpleNamespace(method=self.method, user=AnonymousUser())
        return all(p.has_permission(request, self.view) for p in self.view.get_permissions())

    def get_auth(self):
        auths = super().get_auth()
        if {} not in auths and self._anonymous_allowed():
            auths.append({})  # credentials are optional here
        return auths

    # Filters and pagination take an empty value (`?category=`, as a form sends it) as not given.
    def _get_filter_parameters(self):
        return [{**p, "allowEmptyValue": True} for p in super()._get_filter_parameters()]

    def _get_pagination_parameters(self):
        return [{**p, "allowEmptyValue": True} for p in super()._get_pagination_parameters()]

    def _error_responses(self) -> dict[str, str]:
        has_body = self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None
        responses = {}
        if has_body or any(p["in"] == "query" for p in self._get_parameters()):
            responses["400"] = "Invalid input: nothing was changed."
        if self.view.get_authenticators():
            responses["401"] = "The credentials given are not valid, or this needs credentials and none were given."
        if not self._anonymous_allowed() or self.method not in permissions.SAFE_METHODS:
            responses["403"] = "This needs a staff account (or a session write lacks its CSRF token)."
        if "{" in self.path:
            responses["404"] = "There is nothing with this id."
        elif self.method == "GET" and self._is_list_view() and self._get_paginator():
            responses["404"] = "There is no such page."
        if has_body:
            responses["411"] = "The request body was sent without a Content-Length (chunked); it was not read."
            responses["413"] = "The request body is over the size limit; it was not read."
            responses["415"] = "The request body is not in one of the accepted media types."
        if self.view.get_throttles():
            responses["429"] = "Too many requests from this client; try again after Retry-After seconds."
        responses["503"] = ("A service this needs (the database, the task queue) is down: nothing was changed; try "
                            "again after Retry-After seconds.")
        return responses

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        for code, description in self._error_responses().items():
            if code not in responses:
                responses[code] = self._get_response_for_code(
                    OpenApiResponse(ApiError, description=description), code, direction=direction
                )
        for code in ("429", "503"):
            if code in responses:
                responses[code]["headers"] = {**RETRY_AFTER, **responses[code].get("headers", {})}
        return dict(sorted(responses.items()))
