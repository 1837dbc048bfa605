"""plans and budgets: jobs.plan; workers.memory_budget_bytes, scratch_budget_bytes, throughput

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('plan', sa.JSON(), nullable=True))
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('memory_budget_bytes', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('scratch_budget_bytes', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('throughput', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('throughput')
        batch_op.drop_column('scratch_budget_bytes')
        batch_op.drop_column('memory_budget_bytes')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('plan')
