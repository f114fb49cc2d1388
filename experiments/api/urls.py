from django.urls import path

from experiments.api import views
from labsite.api import OptionalSlashRouter

router = OptionalSlashRouter()
router.register("runs", views.RunViewSet, basename="run")
router.register("sweeps", views.SweepViewSet, basename="sweep")
router.register("plans", views.PlanViewSet, basename="plan")
router.register("alerts", views.AlertViewSet, basename="alert")
router.register("prompt-skills", views.PromptSkillViewSet, basename="prompt-skill")

urlpatterns = [
    path("cluster", views.ClusterView.as_view(), name="cluster"),
    path("cluster/detect", views.ClusterDetectView.as_view(), name="cluster-detect"),
    path("wild/v2/system-health", views.SystemHealthView.as_view(), name="system-health"),
    path(
        "wild/v2/events/<str:session_id>", views.SessionEventsView.as_view(), name="session-events"
    ),
    path("health", views.HealthView.as_view(), name="health"),
    *router.urls,
]
