"""job recipe: jobs.recipe, the named recipe a job's steps were expanded from

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from alembic import op
import sqlalchemy as sa


revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: jobs from before recipes, and jobs given steps, name none.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('recipe', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('recipe')
