"""operator tools: each device's newest status applied (status_ts, status_online), so a
birth and the death that closes it are applied newest-first whatever order they arrive in

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.add_column(sa.Column('status_ts', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('status_online', sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.drop_column('status_online')
        batch_op.drop_column('status_ts')
