"""Tools: the `sales` schema the sales-report tool reads, and the audit trail of tool executions.

Revision ID: 0002_tools_sales
Revises: 0001_memory
Create Date: 2026-11-21
"""

from alembic import op

revision = "0002_tools_sales"
down_revision = "0001_memory"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS sales")
    # One row: one rep's closed deals for one product on one day. `demo` marks generated demo rows.
    op.execute(
        """
        CREATE TABLE sales.daily_sales (
            id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            sale_date    date NOT NULL,
            region       text NOT NULL,
            product      text NOT NULL,
            sales_rep    text NOT NULL,
            deals_closed integer NOT NULL CHECK (deals_closed >= 0),
            amount       numeric(14, 2) NOT NULL CHECK (amount >= 0),
            demo         boolean NOT NULL DEFAULT false,
            created_at   timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX daily_sales_date ON sales.daily_sales (sale_date)")
    op.execute("CREATE INDEX daily_sales_region_date ON sales.daily_sales (lower(region), sale_date)")
    op.execute(
        "CREATE UNIQUE INDEX daily_sales_demo_key ON sales.daily_sales (sale_date, region, product, sales_rep) "
        "WHERE demo"
    )
    op.execute(
        """
        CREATE TABLE tools_audit (
            id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            created_at          timestamptz NOT NULL DEFAULT now(),
            request_id          text NOT NULL DEFAULT '',
            user_id             text NOT NULL,
            tool                text NOT NULL,
            call_id             text NOT NULL DEFAULT '',
            arguments           jsonb NOT NULL,
            arguments_truncated boolean NOT NULL DEFAULT false,
            outcome             text NOT NULL,
            error               text NOT NULL DEFAULT '',
            duration_ms         double precision NOT NULL,
            result_bytes        integer NOT NULL DEFAULT 0
        )
        """
    )
    op.execute("CREATE INDEX tools_audit_user_created ON tools_audit (user_id, created_at DESC)")
    op.execute("CREATE INDEX tools_audit_tool_created ON tools_audit (tool, created_at DESC)")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS tools_audit")
    op.execute("DROP TABLE IF EXISTS sales.daily_sales")
    op.execute("DROP SCHEMA IF EXISTS sales")
