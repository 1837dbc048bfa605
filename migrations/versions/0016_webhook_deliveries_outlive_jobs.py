"""webhook deliveries outlive their job: no foreign key from webhook_deliveries.job_id to jobs

A job deleted right after it ended (a client that downloads the artifact, then deletes the job)
took its pending webhook delivery with it (ON DELETE CASCADE), so the notification that the job
ended was never sent. The delivery carries the job as it ended in its payload; it needs the row
no more. Pending deliveries now stay when their job is deleted, and a finished one whose job is
gone is removed once its outcome is recorded (core/jobs/repository.py, core/webhooks/repository.py).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from alembic import op
import sqlalchemy as sa


revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_constraint('fk_webhook_deliveries_job_id', type_='foreignkey')


def downgrade() -> None:
    # Deliveries whose job is gone cannot reference it again.
    op.execute(sa.text('DELETE FROM webhook_deliveries WHERE job_id NOT IN (SELECT id FROM jobs)'))
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.create_foreign_key('fk_webhook_deliveries_job_id', 'jobs', ['job_id'], ['id'], ondelete='CASCADE')
