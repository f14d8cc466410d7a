import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "visualsearch.settings")
application = get_wsgi_application()

# Import every view (and the ML stack behind search) now, while the worker starts, rather than on the first
# request: Django resolves its URLconf lazily, and that import takes seconds on a slow machine.
from django.urls import get_resolver  # noqa: E402

get_resolver().url_patterns
