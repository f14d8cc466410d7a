"""The API's routes."""
from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.authtoken.views import obtain_auth_token

from catalog.api import views
from catalog.api.categorizer import CategorizerApi, CategorizerApplyApi, CategorizerTrainApi
from catalog.api.duplicates import DuplicatesApi
from catalog.api.health import HealthApi
from catalog.api.ingest import IngestJobCreateApi, IngestJobDetailApi, IngestJobReportApi
from catalog.api.models import (
    EvaluateApi,
    EvaluateLatestApi,
    FinetuneApi,
    ModelDetailApi,
    ModelListApi,
    PromoteApi,
    RollbackApi,
)
from catalog.api.search import ExplainApi, SearchApi

urlpatterns = [
    path("auth/token/", obtain_auth_token, name="api-token"),
    path("categories/", views.CategoryListCreateApi.as_view(), name="category-list"),
    path("categories/<int:pk>/", views.CategoryDetailApi.as_view(), name="category-detail"),
    path("products/", views.ProductListCreateApi.as_view(), name="product-list"),
    path("products/<int:pk>/", views.ProductDetailApi.as_view(), name="product-detail"),
    path("products/<int:pk>/images/", views.ProductImageUploadApi.as_view(), name="product-images"),
    path("images/<int:pk>/", views.ImageDetailApi.as_view(), name="image-detail"),
    path("search/", SearchApi.as_view(), name="search"),
    path("search/explain/", ExplainApi.as_view(), name="search-explain"),
    path("ingest-jobs/", IngestJobCreateApi.as_view(), name="ingest-job-list"),
    path("ingest-jobs/<int:pk>/", IngestJobDetailApi.as_view(), name="ingest-job-detail"),
    path("ingest-jobs/<int:pk>/report.csv", IngestJobReportApi.as_view(), name="ingest-job-report"),
    path("categorizer/", CategorizerApi.as_view(), name="categorizer"),
    path("categorizer/train/", CategorizerTrainApi.as_view(), name="categorizer-train"),
    path("categorizer/apply/", CategorizerApplyApi.as_view(), name="categorizer-apply"),
    path("models/", ModelListApi.as_view(), name="model-list"),
    path("models/finetune/", FinetuneApi.as_view(), name="model-finetune"),
    path("models/<int:pk>/", ModelDetailApi.as_view(), name="model-detail"),
    path("models/<int:pk>/promote/", PromoteApi.as_view(), name="model-promote"),
    path("models/<int:pk>/rollback/", RollbackApi.as_view(), name="model-rollback"),
    path("evaluate/", EvaluateApi.as_view(), name="evaluate"),
    path("evaluate/latest/", EvaluateLatestApi.as_view(), name="evaluate-latest"),
    path("duplicates/", DuplicatesApi.as_view(), name="duplicates"),
    path("health/", HealthApi.as_view(), name="health"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
]
