"""health buckets: each device's health per model, release and minute of arrival

One row per (device, model, release, minute) (``HealthBucket``), summed by the ingester as
it stores each report, so the rollout gates read a stage's window as sums over buckets
instead of scanning raw health reports on every controller tick (fleet.rollout.health_buckets,
fleet.rollout.health_reads).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'healthbucket',
        sa.Column('device_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('release', sa.BigInteger(), nullable=False),
        sa.Column('minute', sa.DateTime(timezone=True), nullable=False),
        sa.Column('reports', sa.Integer(), nullable=False),
        sa.Column('inferences', sa.BigInteger(), nullable=False),
        sa.Column('errors', sa.BigInteger(), nullable=False),
        sa.Column('p95_sum', sa.Float(), nullable=False),
        sa.Column('p95_count', sa.Integer(), nullable=False),
        sa.Column('drift_sum', sa.Float(), nullable=False),
        sa.Column('drift_count', sa.Integer(), nullable=False),
        sa.Column('suspect', sa.Integer(), nullable=False),
        sa.Column('first_received', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_received', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('device_id', 'model', 'release', 'minute'),
    )
    op.create_index('ix_healthbucket_model_release_minute', 'healthbucket',
                    ['model', 'release', 'minute'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_healthbucket_model_release_minute', table_name='healthbucket')
    op.drop_table('healthbucket')
