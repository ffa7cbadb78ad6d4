"""Training records: one JSONL object per image with the seed's fields and the image size."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from gundam.config import check_int
from gundam.inputs import jsonl_lines


@dataclass(frozen=True)
class Record:
    """One image and its text: the seed format plus the image size (batches are planned without decoding)."""
    id: str
    image: str          # path relative to the records file
    source: str
    type: str
    prompt: str
    answer: str
    width: int
    height: int


def read_records(path) -> list[Record]:
    """Records from a JSONL file, one object per line (blank lines skipped, other fields ignored)."""
    names = [f.name for f in fields(Record)]
    records = []
    for where, obj, error in jsonl_lines(path):
        if error:
            raise ValueError(error)
        missing = [k for k in names if k not in obj] if isinstance(obj, dict) else names
        if missing:
            raise ValueError(f"{where}: missing fields {missing}: expected {names}")
        for key in ("width", "height"):
            check_int(obj[key], f"{where}: {key}")
        for key in ("id", "image", "source", "type", "prompt", "answer"):
            if not isinstance(obj[key], str):
                raise ValueError(f"{where}: {key}={obj[key]!r}: expected a string")
        records.append(Record(**{k: obj[k] for k in names}))
    return records


def write_records(path, records: list[Record]):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
