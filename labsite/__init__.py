"""Labsite: the control plane an ML research lab runs its GPUs through."""

from labsite.celery import app as celery_app

__all__ = ["celery_app"]
