"""List filters (products, ingest jobs), strict about what they accept."""
import django_filters
from django import forms
from django.db.models import Q

from catalog.models import IngestJob, Product
from catalog.selectors import category_descendant_ids


class StrictBooleanField(forms.NullBooleanField):
    """true or false; anything else is an error, never silently ignored."""

    widget = forms.TextInput  # the default widget turns any unknown value into "not given"

    def to_python(self, value):
        if value in (None, ""):
            return None
        if str(value).lower() in ("true", "1"):
            return True
        if str(value).lower() in ("false", "0"):
            return False
        raise forms.ValidationError("must be true or false, not %(value)s", params={"value": repr(str(value)[:50])})

    def validate(self, value):
        pass


class StrictBooleanFilter(django_filters.BooleanFilter):
    field_class = StrictBooleanField


class IdFilter(django_filters.NumberFilter):
    field_class = forms.IntegerField  # an id: 0.5 is an error, not 0


class ProductFilter(django_filters.FilterSet):
    category = IdFilter(
        method="filter_category", label="Category id; its subcategories are included."
    )
    uncategorized = StrictBooleanFilter(
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


class IngestJobFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=IngestJob.Status.choices, label="Only jobs with this status.")

    class Meta:
        model = IngestJob
        fields = ["status"]
