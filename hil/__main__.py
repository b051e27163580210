"""``python -m hil run SCENARIO.toml --report OUT_DIR``: one scenario, a report, exit 0 on pass."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hil.scenario import ScenarioError, load_scenario

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hil",
        description="Hardware-in-the-loop: the real agent, fleet and broker on emulated devices "
                    "(network namespaces when allowed; needs root) or real devices over SSH.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run scenarios and write a report for each")
    r.add_argument("scenarios", nargs="+", type=Path, metavar="SCENARIO.toml",
                   help=f"scenario files (see {HERE / 'scenarios'})")
    r.add_argument("--report", type=Path, required=True, metavar="OUT_DIR",
                   help="report.md, report.json and logs go here (one subfolder per scenario when several)")
    r.add_argument("--mode", choices=("auto", "netns", "process", "ssh"), default="auto",
                   help="auto: namespaces when allowed, else plain processes (the report says so)")
    r.add_argument("--inventory", type=Path, metavar="INVENTORY.toml",
                   help="real devices for --mode ssh (see hil/ssh.py)")
    r.add_argument("--harness-address", metavar="ADDR",
                   help="--mode ssh: the address the devices reach this machine at (the fleet and the "
                        "broker listen on every address); overrides [harness] address of the inventory")
    sub.add_parser("list", help="list the bundled scenarios")
    args = p.parse_args(argv)
    if args.command == "list":
        for path in sorted((HERE / "scenarios").glob("*.toml")):
            sc = load_scenario(path)
            print(f"{path.name:<32} {sc.description.splitlines()[0] if sc.description else sc.name}")
        return 0
    inventory = None
    if args.mode == "ssh":
        if args.inventory is None:
            p.error("--mode ssh needs --inventory")
        from hil.ssh import load_inventory

        try:
            inventory = load_inventory(args.inventory)
        except ScenarioError as exc:
            print(f"python -m hil: {exc}", file=sys.stderr)
            return 2
        if not (args.harness_address or inventory.harness_address):
            p.error("--mode ssh needs the address the devices reach this machine at: "
                    "--harness-address or [harness] address in the inventory")
    from hil.remote import SshRun
    from hil.runner import HilRun

    failed = 0
    for path in args.scenarios:
        try:
            scenario = load_scenario(path)
        except ScenarioError as exc:
            print(f"python -m hil: {exc}", file=sys.stderr)
            return 2
        out = args.report if len(args.scenarios) == 1 else args.report / path.stem
        if inventory is not None:
            report = SshRun(scenario, out, inventory, harness_address=args.harness_address,
                            inventory_path=args.inventory).run()
        else:
            report = HilRun(scenario, out, mode=args.mode).run()
        print(f"{scenario.name}: {report['verdict'].upper()} in {report['duration_s']} s "
              f"({report['mode']} mode) — {out / 'report.md'}")
        failed += report["verdict"] != "pass"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
