"""Runs on hosts: dispatch, sync (the poll), cancel, reconcile; placement is experiments.scheduler.

The database is the truth for intent, the host for processes. Every status change goes
through services.run_transition; no lock or transaction is held while a host is talked to.
"""

from experiments.runner.cancel import run_cancel
from experiments.runner.dispatch import launch_spec, run_dispatch
from experiments.runner.reconcile import hosts_to_poll, hosts_with_active_runs, reconcile
from experiments.runner.sync import DISPATCH_RESEND_AFTER, host_sync

__all__ = [
    "DISPATCH_RESEND_AFTER",
    "host_sync",
    "hosts_to_poll",
    "hosts_with_active_runs",
    "launch_spec",
    "reconcile",
    "run_cancel",
    "run_dispatch",
]
