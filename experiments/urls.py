"""The browser pages. Names avoid the API's (`cluster`, `run-detail`): one URL namespace."""

from django.contrib.auth import views as auth_views
from django.urls import path
from django.views.generic import RedirectView

from experiments import views
from labsite.auth import LoginForm

urlpatterns = [
    path(
        "login",
        auth_views.LoginView.as_view(
            redirect_authenticated_user=True, authentication_form=LoginForm
        ),
        name="login",
    ),
    path("logout", auth_views.LogoutView.as_view(), name="logout"),
    path("password", auth_views.PasswordChangeView.as_view(), name="password_change"),
    path("password/done", auth_views.PasswordChangeDoneView.as_view(), name="password_change_done"),
    path("", views.dashboard, name="dashboard"),
    path("runs", RedirectView.as_view(pattern_name="dashboard", query_string=True)),
    path("runs/new", views.run_new, name="run_new"),
    path("runs/<str:run_id>", views.run_detail, name="run_detail"),
    path("runs/<str:run_id>/start", views.run_start, name="run_start"),
    path("runs/<str:run_id>/stop", views.run_stop, name="run_stop"),
    path("runs/<str:run_id>/rerun", views.run_rerun, name="run_rerun"),
    path("sweeps", views.sweep_list, name="sweep_list"),
    path("sweeps/<str:sweep_id>", views.sweep_detail, name="sweep_detail"),
    path("plans", views.plan_list, name="plan_list"),
    path("plans/new", views.plan_new, name="plan_new"),
    path("plans/<str:plan_id>", views.plan_detail, name="plan_detail"),
    path("plans/<str:plan_id>/edit", views.plan_edit, name="plan_edit"),
    *[
        path(
            f"plans/<str:plan_id>/{action.replace('_', '-')}",
            views.plan_action,
            {"action": action},
            name=f"plan_{action}",
        )
        for action in views.PLAN_ACTIONS
    ],
    path("cluster", views.cluster, name="cluster_board"),
    path("tokens", views.token_list, name="token_list"),
    path("tokens/new", views.token_create, name="token_create"),
    path("tokens/<int:token_id>/revoke", views.token_revoke, name="token_revoke"),
]
