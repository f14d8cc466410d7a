from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie

from catalog import selectors


@ensure_csrf_cookie
def home(request):
    """The shopper page: search the catalog with a photo."""
    return render(request, "catalog/home.html", {
        "categories": selectors.category_list(),
        "has_products": selectors.product_list(active_only=True).exists(),
    })
