"""job output format: jobs.output ({"format": "safetensors" | "gguf" | "onnx", ...})

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from alembic import op
import sqlalchemy as sa


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: a job from before output formats reads as safetensors (JobOut.from_row).
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('output', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('output')
