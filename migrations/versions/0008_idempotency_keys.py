"""idempotency keys: the stored first response of a create request sent with Idempotency-Key

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

from alembic import op
import sqlalchemy as sa
import core.tables


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('idempotency_keys',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('tenant_id', sa.String(length=36), nullable=False),
    sa.Column('route', sa.String(length=100), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('request_sha256', sa.String(length=64), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=False),
    sa.Column('response_body', sa.JSON(), nullable=False),
    sa.Column('resource_id', sa.String(length=36), nullable=True),
    sa.Column('created_at', core.tables.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name='fk_idempotency_keys_tenant_id', ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'route', 'key', name='uq_idempotency_keys_tenant_route_key')
    )


def downgrade() -> None:
    op.drop_table('idempotency_keys')
