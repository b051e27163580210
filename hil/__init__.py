"""Hardware-in-the-loop harness: the real agent, fleet and broker on emulated devices
(network namespaces, impaired links, power cuts, broker outages, full disks) or on real
devices reached over SSH; ``python -m hil run SCENARIO.toml --report OUT_DIR``."""
