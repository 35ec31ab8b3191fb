"""Chat: API keys (hashed), usage records (one row per model call or cache hit), pending tool approvals.

Revision ID: 0003_chat
Revises: 0002_tools_sales
Create Date: 2026-11-21
"""

from alembic import op

revision = "0003_chat"
down_revision = "0002_tools_sales"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # `id` is the public part of a key (`pk_<id>_<secret>`); only the SHA-256 of the whole key is stored.
    op.execute(
        """
        CREATE TABLE api_keys (
            id           text PRIMARY KEY,
            user_id      text NOT NULL,
            name         text NOT NULL DEFAULT '',
            hash         text NOT NULL,
            is_admin     boolean NOT NULL DEFAULT false,
            created_at   timestamptz NOT NULL DEFAULT now(),
            revoked_at   timestamptz,
            last_used_at timestamptz
        )
        """
    )
    op.execute("CREATE INDEX api_keys_user ON api_keys (user_id)")
    op.execute(
        """
        CREATE TABLE usage_records (
            id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            created_at        timestamptz NOT NULL DEFAULT now(),
            user_id           text NOT NULL,
            session_id        uuid,
            request_id        text NOT NULL DEFAULT '',
            model             text NOT NULL,
            provider          text NOT NULL DEFAULT '',
            prompt_tokens     integer NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
            completion_tokens integer NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
            cost_usd          numeric(18, 10),
            priced            boolean NOT NULL DEFAULT false,
            estimated         boolean NOT NULL DEFAULT false,
            latency_ms        double precision NOT NULL DEFAULT 0,
            cache_hit         boolean NOT NULL DEFAULT false,
            tool_called       text,
            kind              text NOT NULL DEFAULT 'generate' CHECK (kind IN ('generate', 'summary', 'cache'))
        )
        """
    )
    op.execute("CREATE INDEX usage_records_user_created ON usage_records (user_id, created_at DESC)")
    op.execute("CREATE INDEX usage_records_model_created ON usage_records (model, created_at DESC)")
    op.execute("CREATE INDEX usage_records_created ON usage_records (created_at DESC)")
    op.execute(
        """
        CREATE TABLE pending_approvals (
            id         uuid PRIMARY KEY,
            user_id    text NOT NULL,
            session_id uuid NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz NOT NULL,
            state      text NOT NULL DEFAULT 'pending'
                       CHECK (state IN ('pending', 'resolved', 'approved', 'denied', 'expired')),
            payload    jsonb NOT NULL DEFAULT '{}'::jsonb
        )
        """
    )
    op.execute("CREATE INDEX pending_approvals_user_created ON pending_approvals (user_id, created_at DESC)")
    op.execute("CREATE INDEX pending_approvals_expiry ON pending_approvals (expires_at) WHERE state = 'pending'")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS pending_approvals")
    op.execute("DROP TABLE IF EXISTS usage_records")
    op.execute("DROP TABLE IF EXISTS api_keys")
