"""Catalog API: thin views. Each validates input, calls a service or selector, and serializes the result."""
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import generics, status
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog import selectors, services
from catalog.api.filters import ProductFilter
from catalog.api.schema import ERROR, UNAVAILABLE
from catalog.api.serializers import (
    CategoryDeleteQuery,
    CategoryInput,
    CategoryOutput,
    ImageOutput,
    ImageUploadInput,
    ProductInput,
    ProductOutput,
)
from catalog.api.throttling import ScopedRateThrottleFailOpen
from catalog.models import Category, Product, ProductImage


class ReplaceOrChange:
    """PUT replaces the fields given in full, PATCH changes only those given: both through the view's `_update`."""

    def put(self, request, pk: int):
        return self._update(request, pk, partial=False)

    def patch(self, request, pk: int):
        return self._update(request, pk, partial=True)


def _updates(input_serializer, output_serializer):
    """The schema of a ReplaceOrChange view's PUT and PATCH."""
    update = extend_schema(request=input_serializer, responses={200: output_serializer, 400: ERROR})
    return extend_schema_view(put=update, patch=update)


class CategoryListCreateApi(APIView):
    @extend_schema(responses=CategoryOutput(many=True))
    def get(self, request):
        return Response(CategoryOutput(selectors.category_list(), many=True).data)

    @extend_schema(request=CategoryInput, responses={201: CategoryOutput, 400: ERROR})
    def post(self, request):
        data = CategoryInput(data=request.data)
        data.is_valid(raise_exception=True)
        category = services.category_create(**data.validated_data)
        return Response(CategoryOutput(category).data, status=status.HTTP_201_CREATED)


@_updates(CategoryInput, CategoryOutput)
class CategoryDetailApi(ReplaceOrChange, APIView):
    @extend_schema(responses=CategoryOutput)
    def get(self, request, pk: int):
        return Response(CategoryOutput(get_object_or_404(Category, pk=pk)).data)

    def _update(self, request, pk: int, partial: bool):
        category = get_object_or_404(Category, pk=pk)
        data = CategoryInput(data=request.data, partial=partial)
        data.is_valid(raise_exception=True)
        category = services.category_update(category=category, **data.validated_data)
        return Response(CategoryOutput(category).data)

    @extend_schema(
        parameters=[CategoryDeleteQuery],
        responses={204: None, 400: ERROR},
        description="Delete a category. One that holds products or subcategories is refused with a 400 saying how "
                    "many, unless `move_to` names the category they go to.",
    )
    def delete(self, request, pk: int):
        category = get_object_or_404(Category, pk=pk)
        query = CategoryDeleteQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        services.category_delete(category=category, move_to=query.validated_data.get("move_to"))
        return Response(status=status.HTTP_204_NO_CONTENT)


class ProductListCreateApi(generics.ListAPIView):
    serializer_class = ProductOutput
    filterset_class = ProductFilter

    def get_queryset(self):
        return selectors.product_list()

    @extend_schema(request=ProductInput, responses={201: ProductOutput, 400: ERROR})
    def post(self, request):
        data = ProductInput(data=request.data)
        data.is_valid(raise_exception=True)
        product = services.product_create(**data.validated_data)
        return Response(self.get_serializer(product).data, status=status.HTTP_201_CREATED)


@_updates(ProductInput, ProductOutput)
class ProductDetailApi(ReplaceOrChange, APIView):
    def _get(self, pk: int) -> Product:
        return get_object_or_404(selectors.product_list(), pk=pk)

    @extend_schema(responses=ProductOutput)
    def get(self, request, pk: int):
        return Response(ProductOutput(self._get(pk), context={"request": request}).data)

    def _update(self, request, pk: int, partial: bool):
        product = self._get(pk)
        data = ProductInput(data=request.data, partial=partial)
        data.is_valid(raise_exception=True)
        services.product_update(product=product, **data.validated_data)
        return Response(ProductOutput(self._get(pk), context={"request": request}).data)

    @extend_schema(responses={204: None})
    def delete(self, request, pk: int):
        services.product_delete(product=get_object_or_404(Product, pk=pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


class ProductImageUploadApi(APIView):
    parser_classes = [MultiPartParser, FormParser]
    throttle_classes = [ScopedRateThrottleFailOpen]
    throttle_scope = "uploads"

    @extend_schema(
        request={"multipart/form-data": ImageUploadInput},
        responses={201: ImageOutput, 200: ImageOutput, 400: ERROR, 503: UNAVAILABLE},
        description="Upload an image for a product. The same bytes uploaded twice return the existing image (200).",
    )
    def post(self, request, pk: int):
        product = get_object_or_404(Product, pk=pk)
        data = ImageUploadInput(data=request.data)
        data.is_valid(raise_exception=True)
        upload = data.validated_data["image"]
        image, created = services.product_image_add(
            product=product, data=upload.read(), filename=upload.name or ""
        )
        return Response(
            ImageOutput(image, context={"request": request}).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


class ImageDetailApi(APIView):
    @extend_schema(responses=ImageOutput)
    def get(self, request, pk: int):
        image = get_object_or_404(selectors.product_image_list(), pk=pk)
        return Response(ImageOutput(image, context={"request": request}).data)

    @extend_schema(responses={204: None})
    def delete(self, request, pk: int):
        services.product_image_delete(image=get_object_or_404(ProductImage, pk=pk))
        return Response(status=status.HTTP_204_NO_CONTENT)
