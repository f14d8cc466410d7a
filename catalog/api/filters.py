import django_filters
from django.db.models import Q

from catalog.models import Product
from catalog.selectors import category_descendant_ids


class ProductFilter(django_filters.FilterSet):
    category = django_filters.NumberFilter(
        method="filter_category", label="Category id; its subcategories are included."
    )
    uncategorized = django_filters.BooleanFilter(
        method="filter_uncategorized", label="true: only products with no category."
    )
    q = django_filters.CharFilter(method="filter_q", label="Text matched against sku and title.")

    class Meta:
        model = Product
        fields = ["category", "uncategorized", "q"]

    def filter_category(self, queryset, name, value):
        return queryset.filter(category_id__in=category_descendant_ids(int(value)))

    def filter_uncategorized(self, queryset, name, value):
        return queryset.filter(category__isnull=True) if value else queryset

    def filter_q(self, queryset, name, value):
        return queryset.filter(Q(sku__icontains=value) | Q(title__icontains=value)) if value else queryset
