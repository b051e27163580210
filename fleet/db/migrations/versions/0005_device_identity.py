"""device identity: revocation, rotation with overlap, re-enrollment approval, device secret, enrollment tokens

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_DEVICE_TIMES = ('revoked_at', 'previous_credential_until', 'rotation_requested_at',
                 'reenroll_requested_at', 'reenroll_approved_until')


def upgrade() -> None:
    op.create_table('enrollmenttoken',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('token_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=True),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('max_uses', sa.Integer(), nullable=True),
    sa.Column('uses', sa.Integer(), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    with op.batch_alter_table('device', schema=None) as batch_op:
        for name in _DEVICE_TIMES:
            batch_op.add_column(sa.Column(name, sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('previous_credential_hash',
                                      sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('enrollment_token_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('device_secret_hash',
                                      sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_device_previous_credential_hash'),
                              ['previous_credential_hash'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_previous_credential_hash'))
        batch_op.drop_column('device_secret_hash')
        batch_op.drop_column('enrollment_token_id')
        batch_op.drop_column('previous_credential_hash')
        for name in reversed(_DEVICE_TIMES):
            batch_op.drop_column(name)
    op.drop_table('enrollmenttoken')
