"""device claims: each device's sequence window (deduplication) and refused messages

One row per device (``DeviceClaim``): the session and highest sequence number accepted
with a bitmap of those of the 4096 below it not seen yet, and counters of its messages
refused as malformed or out of bounds, as duplicates, over its budget, or by the database
(fleet.ingest.claims).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'deviceclaim',
        sa.Column('device_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('session', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('seq_high', sa.BigInteger(), nullable=True),
        sa.Column('seq_missing', sa.LargeBinary(), nullable=False),
        sa.Column('last_ts', sa.Float(), nullable=True),
        sa.Column('malformed', sa.BigInteger(), nullable=False),
        sa.Column('duplicate', sa.BigInteger(), nullable=False),
        sa.Column('over_budget', sa.BigInteger(), nullable=False),
        sa.Column('db_refused', sa.BigInteger(), nullable=False),
        sa.Column('last_refusal', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=True),
        sa.Column('last_refused_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('over_budget_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('device_id'),
    )


def downgrade() -> None:
    op.drop_table('deviceclaim')
