from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.renderers import OpenApiJsonRenderer
from drf_spectacular.views import SpectacularSwaggerView
from rest_framework import permissions

from labsite.auth import AdminLoginForm
from labsite.schema import CachedSchemaView

admin.site.login_form = AdminLoginForm

urlpatterns = [
    path(
        "api/openapi.json",
        CachedSchemaView.as_view(
            permission_classes=[permissions.AllowAny], renderer_classes=[OpenApiJsonRenderer]
        ),
        name="schema",
    ),
    re_path(
        r"^api/docs/?$",
        SpectacularSwaggerView.as_view(
            url_name="schema", permission_classes=[permissions.AllowAny]
        ),
        name="api-docs",
    ),
    # The /api router: each app's api/urls.py.
    path("api/", include("experiments.api.urls")),
    path("api/", include("clusters.api.urls")),
    path("admin/", admin.site.urls),
    path("", include("experiments.urls")),
]

handler404 = "labsite.api.json_404"
handler500 = "labsite.api.json_500"
