"""The ``edgefleet`` operator command (entry point ``fleet.cli.main:main``)."""
