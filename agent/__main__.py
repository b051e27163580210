"""``python -m agent`` runs the agent CLI, started as the ``edgefleet-agent`` command is
(``agent.launch``: the cyclic collector off during the imports)."""

from agent.launch import main

raise SystemExit(main())
