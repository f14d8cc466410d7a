from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.authtoken.views import obtain_auth_token

from catalog.api import views

urlpatterns = [
    path("auth/token/", obtain_auth_token, name="api-token"),
    path("categories/", views.CategoryListCreateApi.as_view(), name="category-list"),
    path("categories/<int:pk>/", views.CategoryDetailApi.as_view(), name="category-detail"),
    path("products/", views.ProductListCreateApi.as_view(), name="product-list"),
    path("products/<int:pk>/", views.ProductDetailApi.as_view(), name="product-detail"),
    path("products/<int:pk>/images/", views.ProductImageUploadApi.as_view(), name="product-images"),
    path("images/<int:pk>/", views.ImageDetailApi.as_view(), name="image-detail"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
]
