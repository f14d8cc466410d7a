"""The shopper page and uploaded media, each file served as the image type it is."""
import posixpath

from django.conf import settings
from django.http import Http404
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.static import serve
from PIL import Image

from catalog import selectors
from catalog.services import FORMAT_EXTENSIONS

# Stored images are named by their decoded format (catalog/services.py), so the extension says what they are.
Image.init()
IMAGE_MEDIA_TYPES = {ext: Image.MIME[fmt] for fmt, ext in FORMAT_EXTENSIONS.items()}


@ensure_csrf_cookie
def home(request):
    """The shopper page: search the catalog with a photo."""
    return render(request, "catalog/home.html", {
        # Indented by depth, in catalog order: a tree in a select (non-breaking spaces survive rendering).
        "categories": [(c, "\u00a0\u00a0\u00a0" * depth + c.name) for c, depth in selectors.category_tree()],
        "has_products": selectors.product_list(active_only=True).exists(),
    })


def media_file(request, path: str):
    """Uploaded product images, as the image type they are; ingest uploads to staff only, as downloads.

    No name can make a browser read a stored file as a page or an SVG: image types come from a fixed list
    of raster formats, everything else is a download, and the sandbox policy disables scripts regardless.
    """
    path = posixpath.normpath(path)
    content_type = IMAGE_MEDIA_TYPES.get(posixpath.splitext(path)[1].lstrip(".").lower())
    if path.startswith("images/") and content_type:
        disposition = "inline"
    elif path.startswith("ingest/") and request.user.is_staff:  # the admin links a job's manifest and archive
        content_type, disposition = "application/octet-stream", "attachment"
    else:
        raise Http404("no such file")
    response = serve(request, path, document_root=settings.MEDIA_ROOT)
    response["Content-Type"] = content_type
    response["Content-Disposition"] = disposition
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response
