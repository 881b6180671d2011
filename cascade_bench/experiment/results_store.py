"""Results store: one JSON line per evaluated point, with a schema version, rewritten atomically
(temporary file + rename) on every append, so an interrupted sweep leaves only whole records and
resumes by skipping the points already stored."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterator

from ..data.renamed_keys import RENAMED, read_renamed
from ..data.storage import write_text_atomic
from .records import READ_SCHEMA_VERSIONS, SCHEMA_VERSION, Record

__all__ = ["SCHEMA_VERSION", "ResultsStore"]


class ResultsStore:
    """JSON-lines records keyed by ``point_id``: appended and read back as ``Record``s (a line this
    schema does not know is a ValueError naming the file and line)."""

    def __init__(self, path: "Path | str"):
        self.path = Path(path)
        self._records: list[Record] = []
        self._lines: list[str] = []
        renamed_lines = 0
        if self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{self.path}:{number} is not a JSON record ({error})") from None
                if record.get("schema_version") not in READ_SCHEMA_VERSIONS:
                    raise ValueError(
                        f"{self.path}:{number} has schema_version {record.get('schema_version')!r}, "
                        f"this cascade_bench reads {list(READ_SCHEMA_VERSIONS)}"
                    )
                before = line
                line = _renamed_config(record, line, f"{self.path}:{number}")
                renamed_lines += line is not before
                try:
                    self._records.append(Record.from_dict(record))
                except (TypeError, ValueError) as error:
                    raise ValueError(f"{self.path}:{number}: {error}") from None
                self._lines.append(line + "\n")
        if renamed_lines:
            warnings.warn(
                f"{self.path}: the run config of {renamed_lines} record{'s' if renamed_lines > 1 else ''} holds keys "
                f"renamed since ({', '.join(f'{old} -> {new}' for old, new in RENAMED.items())}); read under the "
                f"new names, and written so at the next append",
                FutureWarning,
                stacklevel=2,
            )

    def __contains__(self, point_id: str) -> bool:
        return any(r.point_id == point_id for r in self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def append(self, record: Record) -> None:
        """Store one point's record (rewriting the file atomically)."""
        if not isinstance(record, Record):
            raise TypeError(f"the results store takes a Record, got {type(record).__name__}")
        if not record.point_id:
            raise ValueError("a record needs a 'point_id'")
        if record.point_id in self:
            raise ValueError(f"point {record.point_id!r} is already stored in {self.path}")
        line = json.dumps({"schema_version": SCHEMA_VERSION, **record.as_dict()}, default=str)
        write_text_atomic(self.path, "".join(self._lines) + line + "\n")
        self._lines.append(line + "\n")
        self._records.append(Record.from_dict(json.loads(line)))  # as a later read gives it back


def _renamed_config(record: dict, line: str, source: str) -> str:
    """The stored line of ``record``, its run config's renamed keys read under their new names (in
    ``record`` too), so the next append writes them so and the old name is read once."""
    conditions = record.get("conditions") or {}
    config = conditions.get("config")
    if not isinstance(config, dict) or not set(config) & set(RENAMED):
        return line
    record["conditions"] = {**conditions, "config": read_renamed(config, source, warn=False)}
    return json.dumps(record)
