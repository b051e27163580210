"""The fleet's tables. Times are timezone-aware UTC datetimes in Python; JSON columns use
SQLAlchemy's JSON type (JSON on PostgreSQL, TEXT on SQLite)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, LargeBinary, Table, UniqueConstraint
from sqlmodel import Field, SQLModel

from shared.timeutil import as_utc as as_utc  # re-exported: the fleet imports it from here
from shared.timeutil import utcnow

# the time helpers of shared.timeutil, under the names the fleet's modules import from here
now_utc = utcnow


def table_of(model: type[SQLModel]) -> Table:
    """A model's Core table (SQLModel does not declare ``__table__`` to type checkers)."""
    return SQLModel.metadata.tables[str(model.__tablename__)]


class Device(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    labels: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    credential_hash: str = Field(index=True, max_length=64)
    enrolled_at: datetime = Field(default_factory=now_utc, sa_column=Column(DateTime(timezone=True)))
    last_seen: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    online: bool = False
    # The newest status (birth or death) applied, by the device's clock: a status that does not
    # supersede it (shared.telemetry.messages.status_supersedes) is not applied, and while the
    # newest is a death no health or event brings the device online (only its next birth).
    status_ts: float | None = None
    status_online: bool | None = None
    agent_version: str = ""
    # per model as the device last reported it: fleet.db.device_models.ReportedModel, encoded
    # (read_models / stored_models; the column is JSON, its declared type lives there)
    models: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    last_health: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # bumped on every change of the device's desired state
    generation: int = 0
    # Identity (docs/install.md "Devices: enroll, rotate, revoke"). A revoked device keeps its
    # row (history, rollout evidence) but no credential works for it any more.
    revoked_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    # After a rotation the old credential stays valid until this time (the overlap window).
    previous_credential_hash: str | None = Field(default=None, index=True, max_length=64)
    previous_credential_until: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True)))
    # The operator asked the device to rotate its credentials (it does on its next pull).
    rotation_requested_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    # A re-enrollment without proof waits (Mender's pending auth set) until an operator
    # approves it; the approval allows one re-enrollment with the enrollment token until then.
    reenroll_requested_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    reenroll_approved_until: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    enrollment_token_id: int | None = None
    # SHA-256 of the secret the device made (and stored) before it first enrolled: proof
    # of being it when the answer of an enrollment was lost (fleet.api.enrollment).
    device_secret_hash: str | None = Field(default=None, max_length=64)


class Bundle(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("name", "release", name="uq_bundle_name_release"),)
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=64)
    release: int = Field(sa_column=Column(BigInteger, nullable=False))
    version: str
    digest: str = Field(unique=True, max_length=64)
    envelope: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created: str
    expires: str
    uploaded_at: datetime = Field(default_factory=now_utc, sa_column=Column(DateTime(timezone=True)))
    reissue_of: int | None = Field(default=None, sa_column=Column(BigInteger))
    # role -> sha256, for the blob URLs
    files: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Blob(SQLModel, table=True):
    sha256: str = Field(primary_key=True, max_length=64)
    size: int


class Assignment(SQLModel, table=True):
    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=64)
    model: str = Field(primary_key=True, max_length=64)
    bundle_id: int = Field(foreign_key="bundle.id")
    rollout_id: int | None = None
    generation: int = 0
    updated_at: datetime = Field(default_factory=now_utc, sa_column=Column(DateTime(timezone=True)))


class Rollout(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str
    model: str = Field(index=True, max_length=64)
    bundle_id: int = Field(foreign_key="bundle.id")
    spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    state: str = Field(index=True, default="created")
    current_stage: int = 0
    stage_started_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    started_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    reason: str | None = None
    # the message of the latest evaluation, so the history records changes only
    last_evaluation: str | None = None
    created: datetime = Field(default_factory=now_utc, sa_column=Column(DateTime(timezone=True)))
    updated: datetime = Field(default_factory=now_utc, sa_column=Column(DateTime(timezone=True)))
    # the latest result of every gate of the current stage (GateResult.to_json + stage, ts)
    gate_results: list[Any] | None = Field(default=None, sa_column=Column(JSON))
    # how often the current stage's bake time was extended (on_inconclusive=extend)
    extensions: int = 0
    # approval: the stage waits since, and the stage the operator approved
    awaiting_approval_since: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    approved_stage: int | None = None


class RolloutDevice(SQLModel, table=True):
    rollout_id: int = Field(primary_key=True, foreign_key="rollout.id")
    device_id: str = Field(primary_key=True, max_length=64, index=True)
    stage: int
    previous_bundle_id: int | None = None
    status: str = "pending"  # pending | assigned | rolled_back | removed
    assigned_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    # where the device stands with the target: fleet.rollout.progress.Progress, its reason code
    progress: str = "pending"
    reason: str | None = None
    detail: str = ""


class HealthReport(SQLModel, table=True):
    __table_args__ = (Index("ix_health_device_model_ts", "device_id", "model", "received_at"),)
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64)
    ts: float
    received_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    model: str = Field(max_length=64)
    release: int = Field(sa_column=Column(BigInteger, nullable=False))
    inferences: int = Field(sa_column=Column(BigInteger, nullable=False))
    errors: int = Field(sa_column=Column(BigInteger, nullable=False))
    p50_ms: float | None = None
    p95_ms: float | None = None
    drift: float | None = None
    cpu_percent: float | None = None
    rss_mb: float | None = None


class DeviceEvent(SQLModel, table=True):
    __table_args__ = (Index("ix_event_device_model", "device_id", "model", "release"),)
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64)
    ts: float
    received_at: datetime = Field(default_factory=now_utc, sa_column=Column(DateTime(timezone=True)))
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    model: str = Field(max_length=64)
    kind: str
    release: int = Field(sa_column=Column(BigInteger, nullable=False))
    from_release: int | None = Field(default=None, sa_column=Column(BigInteger))
    reason: str | None = None
    message: str = ""


class GateEvaluation(SQLModel, table=True):
    """One evaluation of one gate of a rollout stage: what was seen, against what bound."""

    __table_args__ = (Index("ix_gate_eval_rollout_stage", "rollout_id", "stage", "gate"),)
    id: int | None = Field(default=None, primary_key=True)
    rollout_id: int = Field(foreign_key="rollout.id")
    stage: int
    stage_name: str = Field(max_length=128)
    gate: str = Field(max_length=64)
    status: str = Field(max_length=16)  # pass | fail | wait
    observed: float | None = None
    threshold: float | None = None
    sample: int = 0
    min_sample: int = 0
    unit: str = Field(default="devices", max_length=32)
    verdict: str = Field(default="wait", max_length=32)  # the stage's decision at that time
    message: str
    figures: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    ts: datetime = Field(default_factory=now_utc, sa_column=Column(DateTime(timezone=True)))


class RolloutEvent(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    rollout_id: int = Field(index=True, foreign_key="rollout.id")
    ts: datetime = Field(default_factory=now_utc, sa_column=Column(DateTime(timezone=True)))
    kind: str
    message: str
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class ApiToken(SQLModel, table=True):
    """An operator API token: only its SHA-256 is stored; the token is shown once."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128)
    token_hash: str = Field(unique=True, max_length=64)
    # comma-separated subset of read, deploy, admin
    scopes: str = Field(max_length=64)
    created: datetime = Field(default_factory=now_utc, sa_column=Column(DateTime(timezone=True)))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class HealthRollup(SQLModel, table=True):
    """Health per device, model, release and hour: kept after raw HealthReport rows are trimmed."""

    __table_args__ = (Index("ix_rollup_model_release", "model", "release"),)
    device_id: str = Field(primary_key=True, max_length=64)
    model: str = Field(primary_key=True, max_length=64)
    release: int = Field(sa_column=Column(BigInteger, primary_key=True))
    hour: datetime = Field(sa_column=Column(DateTime(timezone=True), primary_key=True))
    reports: int = 0
    inferences: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    errors: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    p95_ms_max: float | None = None
    last_ts: float = 0.0


class DeviceClaim(SQLModel, table=True):
    """What the ingesters know of one device's telemetry as claims (fleet.ingest.claims): the
    sequence window of its current session (deduplication) and its refused messages by cause."""

    device_id: str = Field(primary_key=True, max_length=64)
    # the agent's session (a new one when its sequence counter starts over); "" for older agents
    session: str = Field(default="", max_length=32)
    seq_high: int | None = Field(default=None, sa_column=Column(BigInteger))
    # bit i (little-endian) set: seq_high - 1 - i not seen yet (i < claims.WINDOW_BITS); in order: b""
    seq_missing: bytes = Field(default=b"", sa_column=Column(LargeBinary, nullable=False))
    last_ts: float | None = None  # the device's ts on the message of seq_high
    malformed: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    duplicate: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    over_budget: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    db_refused: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    last_refusal: str | None = Field(default=None, max_length=300)
    last_refused_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    over_budget_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class EnrollmentToken(SQLModel, table=True):
    """A token devices enroll with: it only creates new devices; only its SHA-256 is stored.
    It may expire and be limited in uses; revoking it touches no enrolled device."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128)
    token_hash: str = Field(unique=True, max_length=64)
    created: datetime = Field(default_factory=now_utc, sa_column=Column(DateTime(timezone=True)))
    expires_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    max_uses: int | None = None
    uses: int = 0
    revoked_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class DeviceCertificate(SQLModel, table=True):
    """A client certificate the fleet's device CA issued (fleet.identity). Kept after the
    device is deleted: its serial must stay on the CRL until the certificate expires."""

    __table_args__ = (Index("ix_devicecert_device", "device_id", "not_after"),)
    serial: str = Field(primary_key=True, max_length=40)  # hex, as OpenSSL prints it
    device_id: str = Field(max_length=64)
    fingerprint: str = Field(max_length=64)  # SHA-256 of the DER, hex
    issued_at: datetime = Field(default_factory=now_utc,
                                sa_column=Column(DateTime(timezone=True), nullable=False))
    not_after: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class HealthBucket(SQLModel, table=True):
    """Health of one device, model and release per minute of arrival (``received_at`` floored),
    added to by the ingester in the transaction that stores each report
    (fleet.rollout.health_buckets). The rollout gates read sums over the buckets of a stage's
    window instead of every raw report (docs/deployment.md "Sizing")."""

    __table_args__ = (Index("ix_healthbucket_model_release_minute", "model", "release", "minute"),)
    device_id: str = Field(primary_key=True, max_length=64)
    model: str = Field(primary_key=True, max_length=64)
    release: int = Field(sa_column=Column(BigInteger, primary_key=True))
    minute: datetime = Field(sa_column=Column(DateTime(timezone=True), primary_key=True))
    reports: int = 0
    inferences: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    errors: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    # latency and drift as sums and counts of the reports that carry them (their means)
    p95_sum: float = 0.0
    p95_count: int = 0
    drift_sum: float = 0.0
    drift_count: int = 0
    # reports a gate would refuse on their own figures (negative, not finite, errors above
    # inferences): a device with any is read from its raw reports (fleet.rollout.health_reads)
    suspect: int = 0
    first_received: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    last_received: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
