"""`python -m agent.datapath.build PIN_DIR LAYOUT_FILE`: compile the programs and pin them
with their record, as LoadedDatapath does for a changed source, then exit; the agent adopts
what this process pinned (loader.load). Prints what became of the maps as one JSON object;
on failure, the reason on stderr and exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from agent.datapath.loader import DatapathError, LoadedDatapath


def main(argv: list[str]) -> int:
    pin_dir, layout_file = Path(argv[0]), Path(argv[1])
    try:
        datapath = LoadedDatapath(pin_dir, layout_file)
    except DatapathError as exc:
        print(exc, file=sys.stderr)
        return 2
    # The pins and the record stay for the agent: only this process's fds go.
    datapath.close(unpin=False)
    print(json.dumps({"carried_over": datapath.carried_over, "refilled": datapath.refilled}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
