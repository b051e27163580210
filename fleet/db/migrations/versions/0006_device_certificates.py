"""device certificates: the client certificates the fleet's device CA issued (serial,
device, fingerprint, expiry, revocation), the source of the broker's CRL

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'devicecertificate',
        sa.Column('serial', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column('device_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('fingerprint', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('issued_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('not_after', sa.DateTime(timezone=True), nullable=False),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('serial'),
    )
    with op.batch_alter_table('devicecertificate', schema=None) as batch_op:
        batch_op.create_index('ix_devicecert_device', ['device_id', 'not_after'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('devicecertificate', schema=None) as batch_op:
        batch_op.drop_index('ix_devicecert_device')
    op.drop_table('devicecertificate')
