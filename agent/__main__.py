"""``python -m agent`` runs the agent CLI.

The cyclic collector is off while the agent starts: start-up creates objects that live as
long as the process (modules, classes, the loaded models), which the collector would walk
again and again for nothing. ``agent.cli.main`` turns it back on (``run``: once the agent
serves, see ``agent.cli.startup_done``).
"""

import gc

gc.disable()

from agent.cli import main  # noqa: E402  (after gc.disable: the imports are most of a start)

raise SystemExit(main(gc_enabled=True))
