#!/usr/bin/env python3
"""Print pip constraints pinning every dependency of pyproject.toml (runtime and dev) to its lower bound.

    python3 scripts/lower_bounds.py pyproject.toml > lowest.txt    # used by scripts/test.sh --lowest
"""

from __future__ import annotations

import re
import sys
import tomllib


def main(path: str) -> int:
    """Write `name==lower` for each `name>=lower` requirement of the project and its dev extra."""
    with open(path, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"].get("dev", []))
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)\s*", req)
        if m:
            print(f"{m.group(1)}=={m.group(2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))
