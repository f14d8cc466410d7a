"""Page-number pagination with a bounded, validated page size."""
from rest_framework import pagination
from rest_framework.exceptions import ValidationError


class PageNumberPagination(pagination.PageNumberPagination):
    page_size = 20
    page_size_query_param = "page_size"
    max_page_size = 100
    page_size_query_description = f"Results per page, from 1 to {max_page_size} (more is taken as {max_page_size})."

    def get_page_size(self, request) -> int:
        value = request.query_params.get(self.page_size_query_param, "")
        if value == "":
            return self.page_size
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ValidationError({self.page_size_query_param: f"must be a whole number from 1 to "
                                                               f"{self.max_page_size}, not {value[:50]!r}"})
        return min(size, self.max_page_size)
