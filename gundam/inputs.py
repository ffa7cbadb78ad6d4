"""What training data and bulk encoding both read: JSONL lines, and batching by a budget of views.

    for where, obj, error in jsonl_lines("records.jsonl"):   # where: "records.jsonl:3"
        ...
    view_budget_batches([3, 6, 1, 2], budget=7)               # [[0], [1, 2], [3]]
"""
from __future__ import annotations

import json
import os


def jsonl_lines(path):
    """Yield (where, object, error) per non-blank line of a JSONL file: where is "path:line"; a line that is not
    UTF-8 or not JSON gives object None and the error message (the other lines are still read). A UTF-8 byte
    order mark before the first line is skipped. The file is opened before the first line is yielded, so an
    unreadable file is an OSError at once."""
    name = os.fspath(path)
    f = open(name, "rb")   # bytes: a bad line is that line's error, not a UnicodeDecodeError for the whole file

    def lines():
        with f:
            for n, raw in enumerate(f, 1):
                where = f"{name}:{n}"
                if n == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad = raw[e.start:e.start + 1]
                    yield where, None, f"{where}: not UTF-8 (byte {e.start + 1} of the line is {bad!r})"
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, None, f"{where}: not JSON ({e})"
                    continue
                yield where, obj, None
    return lines()


def view_budget_batches(views: list[int], budget: int, order=None) -> list[list[int]]:
    """The indices of `views` in `order` (default: 0, 1, ...) cut into consecutive batches whose views add up to
    at most `budget`: a new batch whenever the next item would pass it (an item over the budget is a batch of
    its own). The encoder's cost follows views (1 + crops per image), not images."""
    batches, current, used = [], [], 0
    for i in range(len(views)) if order is None else order:
        if current and used + views[i] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += views[i]
    if current:
        batches.append(current)
    return batches
