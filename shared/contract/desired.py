"""GET /api/v1/devices/{id}/desired: the releases a device should run (the truth it pulls).

The fleet builds a ``DesiredState`` and encodes it; the agent decodes the same type (then
checks names, digests and releases in ``agent.fleet_client``). Optional fields are left out
of the wire when unset (``omit_defaults``), so agents that predate one never see it.
Unknown fields are accepted: a newer fleet may add some.
"""

from __future__ import annotations

import msgspec


class DesiredShadow(msgspec.Struct):
    """A candidate to evaluate beside the serving release (docs/rollouts.md "Shadow stages").

    Every field is always sent (no ``omit_defaults``): the defaults only fill in for fleets
    that predate a field."""

    release: int
    digest: str
    envelope_url: str
    blob_url: str
    bundle_id: int | str | None = None
    sample_rate: float = 0.1
    max_busy_fraction: float = 0.25
    rollout_id: int | None = None


class DesiredEntry(msgspec.Struct, omit_defaults=True):
    """One model the device should serve, at one release."""

    name: str
    release: int
    digest: str
    bundle_id: int | str
    envelope_url: str
    # a template: ``{sha256}`` stands for each file's digest
    blob_url: str
    shadow: DesiredShadow | None = None
    # The rollout's activation window, "HH:MM-HH:MM" device local time (agent.update.gating).
    activation_window: str | None = None


class DesiredState(msgspec.Struct, omit_defaults=True):
    device_id: str
    # the device's enrollment generation (a re-enrollment moves it on)
    generation: int
    models: list[DesiredEntry]
    # the fleet's clock (UNIX seconds) when it answered; not part of the ETag
    server_time: str | float | None = None
    # The newest trust root the fleet serves (fleets that predate it send none).
    root_version: int | None = None
    # An operator asked this device to rotate its credentials (FleetClient.rotate).
    rotate_credential: bool = False


def stable_part(state: DesiredState) -> bytes:
    """The bytes an ETag covers: the document without ``server_time`` (what the device acts on)."""
    return msgspec.json.encode(msgspec.structs.replace(state, server_time=None))
