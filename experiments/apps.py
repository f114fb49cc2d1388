from django.apps import AppConfig


class ExperimentsConfig(AppConfig):
    name = "experiments"
    verbose_name = "Experiments"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # clusters knows nothing of experiments: what it has to say arrives as signals.
        from clusters.signals import host_key_changed
        from experiments.services.alerts import alert_host_key_changed

        host_key_changed.connect(alert_host_key_changed, dispatch_uid="labsite-host-key-alert")
