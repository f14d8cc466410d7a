"""Request body limits: bodies over the cap are refused with 413 (411 when chunked) before they are read."""
from django.conf import settings
from django.http import JsonResponse


class RequestBodyLimitMiddleware:
    """Refuse a request body far over any accepted upload before Django reads it."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
            # Django reads only Content-Length bytes: a chunked body would arrive empty, so say so instead.
            return JsonResponse(
                {"error": "send the request body with a Content-Length header; chunked bodies are not accepted"},
                status=411,
            )
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return JsonResponse({"error": "the Content-Length header is not a number"}, status=400)
        limit = getattr(settings, "MAX_REQUEST_BYTES_BY_PATH", {}).get(request.path, settings.MAX_REQUEST_BYTES)
        if length > limit:
            return JsonResponse(
                {"error": f"the request body is {length / 1e6:.1f} MB, over the "
                          f"{limit / 1e6:.1f} MB limit"},
                status=413,
            )
        return self.get_response(request)
