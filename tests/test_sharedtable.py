"""The table of cached rows that front ends share: what one process stores another finds, a claim
makes one process the row's computer, and a slot caught halfway through a write is a miss."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from mlserve.sharedtable import HEADER, LEAD, MAX_VALUE_BYTES, PENDING, SLOT_BYTES, SharedTable

KEY = bytes(range(16))
"""Keys are the cache's 16-byte row keys (``CacheView.key``)."""
SLOTS = 64


def in_another_process(path: Path, code: str) -> str:
    """Run ``code`` with ``table`` open on ``path`` in a new process; what it printed."""
    script = f"from mlserve.sharedtable import *\ntable = SharedTable({str(path)!r}, {SLOTS})\n{code}"
    return subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.strip()


def claim_elsewhere(path: Path, key: bytes) -> str:
    """What another process's claim of ``key`` (until a minute from now) found."""
    return in_another_process(path, f"import time; print(table.claim({key!r}, time.monotonic() + 60, time.monotonic()))")


def test_what_one_process_stores_another_finds_until_it_expires(tmp_path: Path) -> None:
    path = tmp_path / "rows.table"
    in_another_process(path, f"import time; table.put({KEY!r}, b'answer', time.monotonic() + 0.3)")
    table = SharedTable(str(path), SLOTS)
    found = table.look(KEY, time.monotonic())
    assert found is not None and found[0] == b"answer"
    assert table.look(b"another row here", time.monotonic()) is None
    assert table.look(KEY, time.monotonic() + 0.3) is None, "expired"


def test_a_claim_makes_one_process_the_rows_computer_until_it_stores_or_releases(tmp_path: Path) -> None:
    path = tmp_path / "rows.table"
    table = SharedTable(str(path), SLOTS)
    now = time.monotonic()
    assert table.claim(KEY, now + 60, now) == LEAD
    assert claim_elsewhere(path, KEY) == PENDING
    assert in_another_process(path, f"import time; print(table.look({KEY!r}, time.monotonic()))") == PENDING
    table.put(KEY, b"answer", now + 60)
    assert claim_elsewhere(path, KEY).startswith("(b'answer'")
    other = b"a failed row key"
    assert table.claim(other, now + 60, now) == LEAD
    table.release(other)
    assert claim_elsewhere(path, other) == LEAD, "released: the next process to ask computes it at once"


def test_a_claim_lapses_at_its_deadline(tmp_path: Path) -> None:
    path = tmp_path / "rows.table"
    in_another_process(path, f"import time; table.claim({KEY!r}, time.monotonic() + 0.2, time.monotonic())")
    table = SharedTable(str(path), SLOTS)
    assert table.look(KEY, time.monotonic()) == PENDING
    assert table.claim(KEY, time.monotonic() + 60, time.monotonic() + 0.2) == LEAD, "its computer gave up"


def test_a_slot_torn_by_concurrent_writes_is_a_miss_never_a_wrong_answer(tmp_path: Path) -> None:
    path = tmp_path / "rows.table"
    table = SharedTable(str(path), SLOTS)
    now = time.monotonic()
    table.put(KEY, b"the first row's answer", now + 60)
    slot = int.from_bytes(KEY[:8], "little") % SLOTS * SLOT_BYTES
    with open(path, "r+b") as file:  # half of another write: the value's bytes, not yet the checksum
        file.seek(slot + HEADER.size)
        file.write(b"the other")
    assert table.look(KEY, now) is None
    assert table.claim(KEY, now + 60, now) == LEAD


def test_a_value_too_long_for_a_slot_is_not_shared_and_ends_the_claim(tmp_path: Path) -> None:
    table = SharedTable(str(tmp_path / "rows.table"), SLOTS)
    now = time.monotonic()
    assert table.claim(KEY, now + 60, now) == LEAD
    table.put(KEY, b"x" * (MAX_VALUE_BYTES + 1), now + 60)
    assert table.look(KEY, now) is None
    table.put(KEY, b"x" * MAX_VALUE_BYTES, now + 60)
    assert table.look(KEY, now) == (b"x" * MAX_VALUE_BYTES, now + 60)
