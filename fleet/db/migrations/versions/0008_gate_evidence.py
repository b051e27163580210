"""gate evidence: no schema change (kept so the chain stays 0001..0008)

The rollout gates weigh each device's evidence from the stored health reports at every
evaluation (fleet.rollout.evidence: per-device bounds, replays by (seq, ts), capped weights),
so they need no table of their own.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
