"""Register an SSH host from the command line, pin its key and print the fingerprint."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from clusters import services
from clusters.choices import HostState
from clusters.models import Host


class Command(BaseCommand):
    help = "Register an SSH host, connect once, pin its host key and print its fingerprint."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--hostname", required=True)
        parser.add_argument("--port", type=int, default=22)
        parser.add_argument("--username", default="")
        parser.add_argument("--identity-file", default="")
        parser.add_argument("--env-setup", default="")
        parser.add_argument("--run-root", default="~/.labsite/runs")
        parser.add_argument("--fingerprint", default="", help="expected SHA256:... (checked)")

    def handle(self, *args: Any, **o: Any) -> None:
        if Host.objects.filter(name=o["name"]).exists():
            raise CommandError(f"a host named {o['name']} exists already")
        host = Host.objects.create(
            name=o["name"],
            kind="ssh",
            hostname=o["hostname"],
            port=o["port"],
            username=o["username"],
            identity_file=o["identity_file"],
            env_setup=o["env_setup"],
            run_root=o["run_root"],
            host_key_fingerprint=o["fingerprint"],
        )
        host, outcome = services.host_probe(host.pk)
        if outcome == HostState.ONLINE:
            self.stdout.write(f"{host.name}: online, host key {host.host_key_fingerprint}")
        elif outcome == HostState.KEY_MISMATCH:
            host.delete()
            raise CommandError(f"{host.name}: {host.state_note}; nothing registered")
        else:
            self.stdout.write(f"{host.name}: registered but offline ({host.state_note})")
