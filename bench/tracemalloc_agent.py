"""Run the agent (``python -m agent ...``) under tracemalloc; SIGUSR1 writes a snapshot.

    python bench/tracemalloc_agent.py OUT_DIR -c CONFIG run

Each SIGUSR1 writes OUT_DIR/snapshot-N.pickle (``tracemalloc.Snapshot.dump``); compare two
with ``bench.b_soak`` (--tracemalloc) or ``Snapshot.load(b).compare_to(Snapshot.load(a),
"traceback")``. Only Python allocations are traced (not onnxruntime's own).
"""

from __future__ import annotations

import runpy
import signal
import sys
import tracemalloc
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    count = [0]

    def dump(signum: int, frame: object) -> None:
        count[0] += 1
        tracemalloc.take_snapshot().dump(str(out / f"snapshot-{count[0]}.pickle"))
        (out / f"snapshot-{count[0]}.done").touch()

    tracemalloc.start(6)
    signal.signal(signal.SIGUSR1, dump)
    sys.argv = ["agent", *sys.argv[2:]]
    runpy.run_module("agent", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
