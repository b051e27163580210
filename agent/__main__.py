"""``python -m agent`` runs the agent CLI."""

from agent.cli import main

raise SystemExit(main())
