from django.shortcuts import render

from catalog import selectors


def home(request):
    products = selectors.product_list(active_only=True)[:24]
    return render(request, "catalog/home.html", {"products": products})
