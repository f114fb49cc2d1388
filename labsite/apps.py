from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


def ensure_roles(**_: Any) -> None:
    """The role groups exist after every migrate; PIs and admins may edit prompt skills."""
    from django.contrib.auth.models import Group, Permission

    from labsite.roles import ADMIN, PI, ROLES

    groups = {name: Group.objects.get_or_create(name=name)[0] for name in ROLES}
    edit = Permission.objects.filter(
        content_type__app_label="experiments", codename="change_promptskill"
    ).first()
    if edit is not None:
        for name in (PI, ADMIN):
            groups[name].permissions.add(edit)


class LabsiteConfig(AppConfig):
    name = "labsite"
    verbose_name = "Labsite accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from labsite import schema  # noqa: F401 - registers the token scheme with drf-spectacular

        post_migrate.connect(ensure_roles, dispatch_uid="labsite.ensure_roles")
