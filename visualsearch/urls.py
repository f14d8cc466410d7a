from django.conf import settings
from django.contrib import admin
from django.urls import include, path, re_path
from django.views.defaults import page_not_found, server_error

from catalog.api.errors import json_not_found, json_server_error
from catalog.views import media_file

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("catalog.api.urls")),
    path("", include("catalog.urls")),
]
if settings.SERVE_MEDIA:
    urlpatterns += [
        re_path(r"^media/(?P<path>.*)$", media_file, name="media"),
    ]


def handler404(request, exception):
    if request.path.startswith("/api/"):
        return json_not_found(request, exception)
    return page_not_found(request, exception)


def handler500(request):
    if request.path.startswith("/api/"):
        return json_server_error(request)
    return server_error(request)
