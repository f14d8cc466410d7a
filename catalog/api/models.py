"""The models (staff): fine-tune the serving one, follow it, promote or roll back; evaluate the serving one."""
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog.api.permissions import IsStaff
from catalog.api.schema import ERROR, UNAVAILABLE
from catalog.evaluation import evaluation_start
from catalog.finetuning import finetune_start
from catalog.model_versions import model_list, model_promote, model_rollback, serving_version
from catalog.models import ModelVersion


class SearchFigures(serializers.Serializer):
    recall_at_1 = serializers.FloatField(help_text="shopper-like queries whose exact product comes first")
    recall_at_10 = serializers.FloatField()
    mrr = serializers.FloatField(help_text="mean reciprocal rank of the exact product")


class CategoryFigures(serializers.Serializer):
    top1 = serializers.FloatField(help_text="held-out products' images whose category is the top prediction")
    top5 = serializers.FloatField()


class Figures(serializers.Serializer):
    search = SearchFigures(allow_null=True)
    categories = CategoryFigures(allow_null=True, help_text="null: fewer than two categories to tell apart")


class Progress(serializers.Serializer):
    stage = serializers.CharField()
    done = serializers.IntegerField(required=False)
    total = serializers.IntegerField(required=False)


def figures(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    search, categories = metrics.get("search"), metrics.get("categories")
    return {
        "search": {key: search[key] for key in ("recall_at_1", "recall_at_10", "mrr")} if search else None,
        "categories": {key: categories[key] for key in ("top1", "top5")} if categories else None,
    }


class PrecisionFigures(serializers.Serializer):
    recall_at_1 = serializers.FloatField()
    top1 = serializers.FloatField(allow_null=True, help_text="null: fewer than two categories to tell apart")


class PrecisionDecision(serializers.Serializer):
    chosen = serializers.ChoiceField(["fp32", "int8", "bf16"], help_text='what "auto" embeds with on this machine kind')
    reason = serializers.CharField()
    figures = serializers.DictField(child=PrecisionFigures(), help_text="fp32, each candidate (int8; bf16 where "
                                    "native), and its queries against fp32 catalog vectors: on the same sample and "
                                    "queries of the evaluation")
    images_per_s = serializers.DictField(child=serializers.FloatField(), required=False,
                                         help_text="each precision embedding the sample, decoding included")
    measured_at = serializers.CharField()


class ComparedModel(serializers.Serializer):
    id = serializers.IntegerField()
    identity = serializers.CharField()
    backbone = serializers.CharField()
    metrics = Figures(allow_null=True, help_text="on the same queries and held-out products")


class MixChoice(serializers.Serializer):
    chosen = serializers.FloatField(help_text="the share of the fine-tuned weights kept (the rest: the starting model's)")
    recall_at_1 = serializers.DictField(child=serializers.FloatField(),
                                        help_text="search recall@1 of each share tried, on photos the evaluation never uses")
    queries = serializers.IntegerField()
    images = serializers.IntegerField()
    seconds = serializers.IntegerField()
    error = serializers.CharField(allow_blank=True, help_text="why the recipe's own mix was kept, if it was")


class ModelOutput(serializers.ModelSerializer):
    progress = serializers.SerializerMethodField()
    mix = serializers.SerializerMethodField()
    metrics = serializers.SerializerMethodField()
    compared_with = serializers.SerializerMethodField()
    decision = serializers.SerializerMethodField()
    precision = serializers.DictField(
        child=PrecisionDecision(), read_only=True,
        help_text="per machine kind (CPU vector extensions, e.g. avx512+vnni+bf16): the precision chosen by the "
                  "catalog's evaluation, with its figures; empty until the model is evaluated on a CPU worker")

    class Meta:
        model = ModelVersion
        fields = ["id", "identity", "backbone", "status", "progress", "metrics", "compared_with", "decision",
                  "mix", "precision", "error", "created_at", "finished_at"]

    @extend_schema_field(Progress)
    def get_progress(self, version: ModelVersion) -> dict:
        return {"stage": version.status, **version.progress}

    @extend_schema_field(Figures(allow_null=True))
    def get_metrics(self, version: ModelVersion) -> dict | None:
        return figures(version.metrics)

    @extend_schema_field(ComparedModel(allow_null=True))
    def get_compared_with(self, version: ModelVersion) -> dict | None:
        other = version.compared_with
        if other is None:
            return None
        return {"id": other.pk, "identity": other.identity, "backbone": other.backbone,
                "metrics": figures(version.compared_metrics)}

    @extend_schema_field(MixChoice(allow_null=True))
    def get_mix(self, version: ModelVersion) -> dict | None:
        return version.decision.get("mix")

    @extend_schema_field(serializers.CharField(allow_blank=True))
    def get_decision(self, version: ModelVersion) -> str:
        return version.decision.get("why", "")


class FinetuneInput(serializers.Serializer):
    epochs = serializers.IntegerField(required=False, min_value=0, max_value=100,
                                      help_text="default: the recipe's for the device (docs/finetuning.md)")


class Accepted(serializers.ModelSerializer):
    class Meta:
        model = ModelVersion
        fields = ["id", "status"]


class ModelListApi(APIView):
    permission_classes = [IsStaff]

    @extend_schema(responses=ModelOutput(many=True), description="Every model, newest first: the one the "
                   "service started with, and each fine-tuning with its figures on the catalog.")
    def get(self, request):
        return Response(ModelOutput(model_list(), many=True).data)


class ModelDetailApi(APIView):
    permission_classes = [IsStaff]

    @extend_schema(responses=ModelOutput)
    def get(self, request, pk: int):
        return Response(ModelOutput(get_object_or_404(ModelVersion, pk=pk)).data)


class FinetuneApi(APIView):
    permission_classes = [IsStaff]

    @extend_schema(request=FinetuneInput, responses={202: Accepted, 400: ERROR, 503: UNAVAILABLE},
                   description="Queue a fine-tuning of the serving model on the catalog (the `train` queue). While "
                               "one works, that one is answered. Follow it with GET /api/models/{id}/.")
    def post(self, request):
        data = FinetuneInput(data=request.data)
        data.is_valid(raise_exception=True)
        version = finetune_start(epochs=data.validated_data.get("epochs"), created_by=request.user)
        response = Response(Accepted(version).data, status=status.HTTP_202_ACCEPTED)
        response["Location"] = request.build_absolute_uri(f"/api/models/{version.pk}/")
        return response


class PromoteApi(APIView):
    permission_classes = [IsStaff]

    @extend_schema(request=None, responses={200: ModelOutput, 400: ERROR},
                   description="Serve this model: its vectors and index are switched in, the category head retrained.")
    def post(self, request, pk: int):
        version = model_promote(version=get_object_or_404(ModelVersion, pk=pk), reason="promoted by hand")
        return Response(ModelOutput(version).data)


class RollbackApi(APIView):
    permission_classes = [IsStaff]

    @extend_schema(request=None, responses={200: ModelOutput, 400: ERROR},
                   description="Serve again the model this serving one replaced; answers that model.")
    def post(self, request, pk: int):
        return Response(ModelOutput(model_rollback(version=get_object_or_404(ModelVersion, pk=pk))).data)


class EvaluateApi(APIView):
    permission_classes = [IsStaff]

    @extend_schema(request=None, responses={202: Accepted, 400: ERROR, 503: UNAVAILABLE},
                   description="Queue the evaluation of the serving model on the catalog; read it at "
                               "GET /api/evaluate/latest/.")
    def post(self, request):
        version = evaluation_start()
        response = Response(Accepted(version).data, status=status.HTTP_202_ACCEPTED)
        response["Location"] = request.build_absolute_uri("/api/evaluate/latest/")
        return response


class EvaluateLatestApi(APIView):
    permission_classes = [IsStaff]

    @extend_schema(responses={200: ModelOutput, 404: ERROR}, description="The serving model and its figures.")
    def get(self, request):
        version = serving_version()
        if version is None:
            return Response({"error": "no model serves yet"}, status=status.HTTP_404_NOT_FOUND)
        return Response(ModelOutput(version).data)
