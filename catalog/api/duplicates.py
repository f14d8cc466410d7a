"""GET /api/duplicates/ (staff): near-duplicate images across products, in groups, best first."""
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog.api.permissions import IsStaff
from catalog.duplicates import duplicate_groups


class DuplicateProduct(serializers.Serializer):
    id = serializers.IntegerField()
    sku = serializers.CharField()
    title = serializers.CharField()


class DuplicateImage(serializers.Serializer):
    id = serializers.IntegerField()
    product = DuplicateProduct()


class DuplicateGroup(serializers.Serializer):
    score = serializers.FloatField(help_text="the highest cosine similarity between two of its images")
    images = DuplicateImage(many=True, help_text="images of different products that are copies of one photo")


class DuplicatesApi(APIView):
    permission_classes = [IsStaff]

    @extend_schema(responses=DuplicateGroup(many=True),
                   description="Open near-duplicate groups of active products, best first (at most 500). Merge them "
                               "or mark them not duplicates in the admin (Near-duplicate pairs).")
    def get(self, request):
        return Response(DuplicateGroup(duplicate_groups(), many=True).data)
