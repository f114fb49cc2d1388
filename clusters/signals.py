"""What clusters tells the rest of the lab without knowing who listens (it never imports them)."""

from django.dispatch import Signal

# Sent once when a host first presents a key other than the pinned one (probe, dispatch or
# poll): kwargs host, expected, presented. Nothing is sent to it until an admin accepts the key.
host_key_changed = Signal()
