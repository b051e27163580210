"""The ``edgefleet-agent`` command (the service's ``ExecStart``) and ``python -m agent``.

The cyclic collector is off before the CLI's modules are imported: start-up creates objects
that live as long as the process (modules, classes, the loaded models), which the collector
would walk again and again for nothing. ``agent.cli.main`` turns it back on (``run``: once
the agent serves, see ``agent.cli.startup_done``; the other commands once their arguments
are parsed). Kept apart from ``agent.cli`` so that the console script, not only
``python -m agent``, starts this way.
"""

import gc


def main() -> int:
    was_on = gc.isenabled()
    gc.disable()
    from agent.cli import main as cli_main  # after gc.disable: the imports are most of a start

    return cli_main(gc_enabled=was_on)
