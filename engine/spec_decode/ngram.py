"""N-gram (prompt lookup) drafts: continue the sequence as it continued after the last time
its current suffix appeared.

For n from `max_n` down to `min_n`: find the most recent earlier occurrence of the last n
tokens; the draft is the k tokens that followed it. Where those run past the end of the
sequence, the draft goes on copying itself (a sequence looping with period p drafts a full
k tokens, not p). Nothing found: no draft. CPU only, numpy over the token list.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def ngram_draft(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` drafted tokens to follow `token_ids` (empty when no n-gram repeats)."""
    length = len(token_ids)
    if k < 1 or length < min_n + 1:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows starting at 0..length-1-n: each is followed by a token, and none is the
        # suffix itself.
        windows = sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            draft: list[int] = []
            for j in range(k):
                at = start + j
                draft.append(token_ids[at] if at < length else draft[at - length])
            return draft
    return []
