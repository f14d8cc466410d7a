"""The category head: train it (staff), read how good it is, apply its suggestions (staff)."""
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog.api.permissions import IsStaff
from catalog.api.schema import ERROR, UNAVAILABLE
from catalog.categorizer import categorizer_status, categorizer_train_start
from catalog.models import CategorizerVersion
from catalog.suggestions import suggestions_apply


class CategoryMetrics(serializers.Serializer):
    precision = serializers.FloatField(allow_null=True, help_text="null: never predicted")
    recall = serializers.FloatField(allow_null=True, help_text="null: no held-out image")
    support = serializers.IntegerField(help_text="held-out images of the category")


class ThresholdRow(serializers.Serializer):
    threshold = serializers.FloatField()
    precision = serializers.FloatField(allow_null=True, help_text="share of top suggestions at or above it that are right")
    coverage = serializers.FloatField(allow_null=True, help_text="share of products whose top suggestion reaches it")
    count = serializers.IntegerField()


class CategorizerMetrics(serializers.Serializer):
    top1 = serializers.FloatField(allow_null=True, help_text="held-out images whose category is the top prediction")
    top5 = serializers.FloatField(allow_null=True, help_text="held-out images whose category is among the top 5")
    per_category = serializers.DictField(child=CategoryMetrics(), help_text="by category path")
    thresholds = ThresholdRow(many=True, help_text="cross-fitted: what an apply threshold means")


class CategorizerOutput(serializers.Serializer):
    status = serializers.ChoiceField(choices=CategorizerVersion.Status.choices)
    error = serializers.CharField(allow_blank=True, help_text="why the newest training failed")
    version = serializers.CharField(allow_null=True, help_text="the head in service; null before one is trained")
    model_identity = serializers.CharField(allow_null=True)
    trained_at = serializers.DateTimeField(allow_null=True)
    n_train = serializers.IntegerField(allow_null=True)
    n_test = serializers.IntegerField(allow_null=True)
    metrics = CategorizerMetrics(allow_null=True)


class CategorizerTrainAccepted(serializers.ModelSerializer):
    class Meta:
        model = CategorizerVersion
        fields = ["id", "status", "error"]


class NumberField(serializers.FloatField):
    """A float that refuses JSON true and false (Python's float() would take them as 1 and 0)."""

    def to_internal_value(self, data):
        if isinstance(data, bool):
            self.fail("invalid")
        return super().to_internal_value(data)


class ApplyInput(serializers.Serializer):
    threshold = NumberField(min_value=0.0, max_value=1.0, help_text="e.g. 0.8")


class ApplyOutput(serializers.Serializer):
    changed = serializers.IntegerField(help_text="products that got a category")


class CategorizerApi(APIView):
    @extend_schema(
        responses=CategorizerOutput,
        description="status is the newest training's (untrained, training, ready, failed with error); version, "
                    "trained_at, n_train and metrics describe the head in service, which keeps serving while a "
                    "new one trains.",
    )
    def get(self, request):
        return Response(CategorizerOutput(categorizer_status()).data)


class CategorizerTrainApi(APIView):
    permission_classes = [IsStaff]

    @extend_schema(
        request=None,
        responses={202: CategorizerTrainAccepted, 400: ERROR, 503: UNAVAILABLE},
        description="Queue a training from the categorized products' indexed images; follow it with GET "
                    "/api/categorizer/. Too few categorized products is a 400 saying how many there are. While a "
                    "training runs, it is the one answered.",
    )
    def post(self, request):
        version = categorizer_train_start(created_by=request.user)
        response = Response(CategorizerTrainAccepted(version).data, status=status.HTTP_202_ACCEPTED)
        response["Location"] = request.build_absolute_uri("/api/categorizer/")
        return response


class CategorizerApplyApi(APIView):
    permission_classes = [IsStaff]

    @extend_schema(
        request=ApplyInput,
        responses={200: ApplyOutput, 400: ERROR},
        description="Give every uncategorized product the category of its top suggestion where that suggestion's "
                    "score is at least threshold; the suggestion becomes accepted.",
    )
    def post(self, request):
        data = ApplyInput(data=request.data)
        data.is_valid(raise_exception=True)
        return Response(ApplyOutput({"changed": suggestions_apply(threshold=data.validated_data["threshold"])}).data)
