"""Every API operation, read from the URL configuration, so that a new endpoint is tested without a test edit."""
import re

from django.urls import URLResolver, get_resolver

UNSAFE_METHODS = ("post", "put", "patch", "delete")
# Writes that are public by design: logging in, and a search (its query image is never stored).
PUBLIC_WRITES = {("POST", "/api/auth/token/"), ("POST", "/api/search/"), ("POST", "/api/search/explain/")}


def _routes(patterns, prefix: str = ""):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            yield prefix + str(pattern.pattern), pattern.callback


def api_operations(object_id: int, methods=UNSAFE_METHODS) -> list[tuple[str, str]]:
    """(METHOD, path) of each API view method, with `object_id` for every id in the path."""
    operations = []
    for route, callback in _routes(get_resolver().url_patterns):
        view = getattr(callback, "cls", None) or getattr(callback, "view_class", None)
        if not route.startswith("api/") or view is None:
            continue
        path = "/" + re.sub(r"<int:\w+>", str(object_id), route)
        assert "<" not in path, f"{route}: give api_operations an example value for this kind of parameter"
        operations += [(method.upper(), path) for method in methods if hasattr(view, method)]
    return operations
