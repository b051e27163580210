"""release numbers, sequence numbers and counters as 64-bit integers

Release numbers span 1 .. 2**53 - 1 (shared.release), which a 32-bit INTEGER column on
PostgreSQL cannot hold; sequence numbers and inference counters come from devices and are
bounded by the ingester, not by the column.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_COLUMNS: dict[str, list[tuple[str, bool]]] = {
    # table: [(column, nullable)]
    'bundle': [('release', False), ('reissue_of', True)],
    'healthreport': [('seq', False), ('release', False), ('inferences', False), ('errors', False)],
    'deviceevent': [('seq', False), ('release', False), ('from_release', True)],
    'healthrollup': [('release', False), ('inferences', False), ('errors', False)],
}


def _retype(old: sa.types.TypeEngine, new: sa.types.TypeEngine) -> None:
    for table, columns in _COLUMNS.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column, nullable in columns:
                batch_op.alter_column(column, existing_type=old, type_=new, existing_nullable=nullable)


def upgrade() -> None:
    _retype(sa.Integer(), sa.BigInteger())


def downgrade() -> None:
    _retype(sa.BigInteger(), sa.Integer())
