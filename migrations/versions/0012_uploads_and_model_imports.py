"""resumable uploads and model imports: the uploads table (tus, /v1/uploads); models.status,
source, progress, error and lease_expires_at (POST /v1/models/import)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from alembic import op
import sqlalchemy as sa

import core.tables


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing models are complete uploads: "ready".
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('status', sa.String(length=16), server_default=sa.text("'ready'"), nullable=False))
        batch_op.add_column(sa.Column('source', sa.String(length=2000), nullable=True))
        batch_op.add_column(sa.Column('progress', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('error', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', core.tables.UTCDateTime(timezone=True), nullable=True))
    op.create_table(
        'uploads',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('tenant_id', sa.String(length=36), nullable=False),
        sa.Column('length', sa.BigInteger(), nullable=False),
        sa.Column('offset', sa.BigInteger(), nullable=False),
        sa.Column('meta', sa.JSON(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=True),
        sa.Column('created_at', core.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column('expires_at', core.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column('consumed_at', core.tables.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.create_index('ix_uploads_expires', ['expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_uploads_tenant_id'), ['tenant_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_uploads_tenant_id'))
        batch_op.drop_index('ix_uploads_expires')
    op.drop_table('uploads')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('error')
        batch_op.drop_column('progress')
        batch_op.drop_column('source')
        batch_op.drop_column('status')
