#!/usr/bin/env python3
"""Write docs/snapshot.schema.json from memtop/schema.py (the one declaration of the records).

`python scripts/gen_schema.py` rewrites it; `--check` exits 1 when it is out of date (a test runs that)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtop.schema import json_schema  # noqa: E402

TARGET = Path(__file__).resolve().parent.parent / "docs" / "snapshot.schema.json"


def render() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python scripts/gen_schema.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
