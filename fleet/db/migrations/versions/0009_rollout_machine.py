"""rollout machine: no schema change

Reserved for the rollout machine (verdicts as actions, stage deadlines); it needs no column:
a stage's deadline is in the spec (JSON, ``deadline_seconds``) and counts from the stored
``stage_started_at``, and actions are applied in the tick that plans them, never stored.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
