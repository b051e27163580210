"""edgefleet benchmarks: ``make bench`` (or ``python -m bench.run``); see docs/performance.md."""
