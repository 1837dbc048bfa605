"""datasets, model config, job datasets

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from alembic import op
import sqlalchemy as sa
import core.tables


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('datasets',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('tenant_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('samples', sa.Integer(), nullable=False),
    sa.Column('labeled', sa.Boolean(), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('storage_key', sa.String(length=400), nullable=False),
    sa.Column('created_at', core.tables.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.create_index('ix_datasets_tenant_created', ['tenant_id', 'created_at'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dataset_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('eval_dataset_id', sa.String(length=36), nullable=True))
        batch_op.create_foreign_key('fk_jobs_eval_dataset_id', 'datasets', ['eval_dataset_id'], ['id'], ondelete='SET NULL')
        batch_op.create_foreign_key('fk_jobs_dataset_id', 'datasets', ['dataset_id'], ['id'], ondelete='SET NULL')

    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('config', sa.JSON(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('config')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_jobs_eval_dataset_id', type_='foreignkey')
        batch_op.drop_constraint('fk_jobs_dataset_id', type_='foreignkey')
        batch_op.drop_column('eval_dataset_id')
        batch_op.drop_column('dataset_id')

    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_index('ix_datasets_tenant_created')

    op.drop_table('datasets')
