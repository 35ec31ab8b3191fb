"""Memory: conversations, messages, documents and chunks, with pgvector and full-text indexes.

Revision ID: 0001_memory
Revises:
Create Date: 2026-11-21
"""

from alembic import op

revision = "0001_memory"
down_revision = None
branch_labels = None
depends_on = None

EMBEDDING_DIM = 384


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.execute(
        """
        CREATE TABLE conversations (
            id            uuid PRIMARY KEY,
            user_id       text NOT NULL,
            title         text NOT NULL DEFAULT '',
            summary       text NOT NULL DEFAULT '',
            metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
            message_count bigint NOT NULL DEFAULT 0,
            created_at    timestamptz NOT NULL DEFAULT now(),
            updated_at    timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX conversations_user_updated ON conversations (user_id, updated_at DESC, id DESC)")
    op.execute(
        f"""
        CREATE TABLE messages (
            id              uuid PRIMARY KEY,
            seq             bigint GENERATED ALWAYS AS IDENTITY,
            conversation_id uuid NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            user_id         text NOT NULL,
            role            smallint NOT NULL,
            content         text NOT NULL,
            tool_calls      jsonb NOT NULL DEFAULT '[]'::jsonb,
            tool_call_id    text NOT NULL DEFAULT '',
            token_count     integer NOT NULL,
            metadata        jsonb NOT NULL DEFAULT '{{}}'::jsonb,
            created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
            embedding       vector({EMBEDDING_DIM})
        )
        """
    )
    op.execute("CREATE INDEX messages_conversation_seq ON messages (conversation_id, seq)")
    op.execute("CREATE INDEX messages_user_created ON messages (user_id, created_at)")
    op.execute("CREATE INDEX messages_pending_embedding ON messages (seq) WHERE embedding IS NULL")
    op.execute(
        "CREATE INDEX messages_embedding_hnsw ON messages USING hnsw (embedding vector_cosine_ops) "
        "WITH (m = 16, ef_construction = 64)"
    )
    op.execute(
        """
        CREATE TABLE documents (
            id          uuid PRIMARY KEY,
            user_id     text NOT NULL,
            visibility  smallint NOT NULL,
            title       text NOT NULL DEFAULT '',
            source      text NOT NULL DEFAULT '',
            metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
            chunk_count integer NOT NULL DEFAULT 0,
            created_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX documents_user_created ON documents (user_id, created_at DESC, id DESC)")
    op.execute("CREATE INDEX documents_shared_created ON documents (created_at DESC, id DESC) WHERE visibility = 2")
    op.execute(
        f"""
        CREATE TABLE document_chunks (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            document_id uuid NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            user_id     text NOT NULL,
            visibility  smallint NOT NULL,
            chunk_index integer NOT NULL,
            content     text NOT NULL,
            embedding   vector({EMBEDDING_DIM}) NOT NULL,
            tsv         tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED,
            UNIQUE (document_id, chunk_index)
        )
        """
    )
    op.execute("CREATE INDEX document_chunks_tsv ON document_chunks USING gin (tsv)")
    op.execute("CREATE INDEX document_chunks_user ON document_chunks (user_id)")
    op.execute(
        "CREATE INDEX document_chunks_embedding_hnsw ON document_chunks USING hnsw (embedding vector_cosine_ops) "
        "WITH (m = 16, ef_construction = 64)"
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS document_chunks")
    op.execute("DROP TABLE IF EXISTS documents")
    op.execute("DROP TABLE IF EXISTS messages")
    op.execute("DROP TABLE IF EXISTS conversations")
