"""Split text or Markdown into overlapping chunks measured in tokens.

Windows of `chunk_tokens` tokens advance by `chunk_tokens - overlap`; each window's end
is pulled back to the last paragraph, line or sentence break inside its final quarter,
so chunks rarely cut a sentence in half. Chunk text is an exact slice of the input.
"""

from __future__ import annotations

import re

_BREAKS = (re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"[.!?]\s"))


def chunk_text(text: str, tokenizer, chunk_tokens: int, overlap: int) -> list[str]:
    if overlap >= chunk_tokens:
        raise ValueError("overlap must be smaller than chunk_tokens")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    offsets: list[tuple[int, int]] = enc["offset_mapping"]
    if not offsets:
        return [text.strip()] if text.strip() else []
    chunks: list[str] = []
    start_token = 0
    n = len(offsets)
    while start_token < n:
        end_token = min(start_token + chunk_tokens, n)
        start_char = offsets[start_token][0]
        end_char = offsets[end_token - 1][1] if end_token == n else offsets[end_token][0]
        if end_token < n:
            end_char = _snap(text, start_char, end_char)
            # the token where the snapped chunk ends, so the next window starts from there
            end_token = max(start_token + 1, _token_at(offsets, end_char, start_token, end_token))
        piece = text[start_char:end_char].strip()
        if piece:
            chunks.append(piece)
        if end_token >= n:
            break
        start_token = max(end_token - overlap, start_token + 1)
    return chunks


def _snap(text: str, start: int, end: int) -> int:
    """Move `end` back to a natural break within the last quarter of the window, if there is one."""
    floor = start + (end - start) * 3 // 4
    window = text[floor:end]
    for pattern in _BREAKS:
        matches = list(pattern.finditer(window))
        if matches:
            return floor + matches[-1].end()
    return end


def _token_at(offsets: list[tuple[int, int]], char: int, low: int, high: int) -> int:
    for i in range(low, high):
        if offsets[i][0] >= char:
            return i
    return high
