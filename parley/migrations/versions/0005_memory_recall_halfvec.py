"""Memory: the exact recall plan reads half-precision vectors.

The exact plan (migration 0004) ranks every message of one user through an index-only scan of the covering
(user_id, created_at) index. Its time is the bytes of that user's index pages: at 5,000 messages, ~13 MB with
float4 vectors (1,540 bytes each). This migration gives each message a stored half-precision copy of its vector
(`embedding_half`, 776 bytes, generated from `embedding`, so nothing writes it) and covers that instead: half the
pages. The plan shortlists by the halfvec distance and ranks the shortlist by the float4 vectors, so scores stay
exact (`MemoryStore.recall_statements`).

A message row with both vectors (~2.4 KB) passes PostgreSQL's default 2 KB TOAST threshold. The toaster would
then move the float4 vector (or, were that kept in line, the short `content`) out of line: every write would cost
a TOAST insert and every read of it a TOAST fetch. So both vectors are stored in line (storage PLAIN), and the
table's `toast_tuple_target` is raised to 4,080 bytes: a row is toasted only when it passes that, which takes a
long `content`, and then that `content` is compressed or moved out.

Revision ID: 0005_memory_recall_halfvec
Revises: 0004_memory_recall_index
Create Date: 2026-11-22
"""

from alembic import op


revision = "0005_memory_recall_halfvec"
down_revision = "0004_memory_recall_index"
branch_labels = None
depends_on = None

EMBEDDING_DIM = 384  # as in 0001: a migration does not follow later code


def upgrade() -> None:
    # One ALTER TABLE: one rewrite of the table, with the new storage settings already in force.
    op.execute(
        "ALTER TABLE messages SET (toast_tuple_target = 4080), ALTER COLUMN embedding SET STORAGE PLAIN, "
        f"ADD COLUMN embedding_half halfvec({EMBEDDING_DIM}) "
        f"GENERATED ALWAYS AS (CAST(embedding AS halfvec({EMBEDDING_DIM}))) STORED, "
        "ALTER COLUMN embedding_half SET STORAGE PLAIN"
    )
    op.execute(
        "CREATE INDEX messages_user_recall_half ON messages (user_id, created_at) "
        "INCLUDE (id, conversation_id, role, embedding_half)"
    )
    op.execute("DROP INDEX messages_user_recall")


def downgrade() -> None:
    op.execute(
        "CREATE INDEX messages_user_recall ON messages (user_id, created_at) "
        "INCLUDE (id, conversation_id, role, embedding)"
    )
    op.execute("DROP INDEX messages_user_recall_half")
    op.execute("ALTER TABLE messages DROP COLUMN embedding_half, ALTER COLUMN embedding SET STORAGE EXTERNAL, "
               "RESET (toast_tuple_target)")
