"""worker runtimes: workers.runtimes, the optional runtimes a worker has (e.g. llama_cpp)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from alembic import op
import sqlalchemy as sa


revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: a worker of an older version publishes none (the API then assumes it may have any).
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('runtimes', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('runtimes')
