"""``python -m fleet.demo``: the narrated staged rollout with automatic rollback."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from fleet.demo.scenario import DemoConfig, run_demo


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edgefleet demo",
        description="Run a real fleet and several real agents on this machine, roll a healthy "
        "release to all of them, then stage a faulty one and watch the fleet stop it at the "
        "canary and roll it back. Needs no broker or database: the fleet embeds both.",
    )
    parser.add_argument("--agents", type=int, default=5, help="number of agent processes (default 5)")
    parser.add_argument("--workdir", type=Path, help="keep keys, bundles, logs and state here "
                        "(default: a temporary directory, removed at the end)")
    parser.add_argument("--mqtt-url", help="use this broker instead of the embedded one")
    parser.add_argument("--keep-running", action="store_true", help="keep fleet and agents up at the end")
    args = parser.parse_args(argv)
    if args.agents < 2:
        parser.error("--agents must be at least 2 (a canary and the rest)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    # SIGTERM ends the demo like Ctrl-C: its children (own sessions) are stopped, never orphaned
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run_demo(DemoConfig(workdir=workdir, agents=args.agents, mqtt_url=args.mqtt_url),
                          keep_running=args.keep_running)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"edgefleet demo: error: {exc}\n(logs are in {workdir / 'logs'})", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None and not args.keep_running:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = result.second_rollout["state"] == "rolled_back" and all(
        r in result.healthy_releases for r in result.serving.values()
    )
    releases = ", ".join(f"r{r}" for r in sorted(result.healthy_releases))
    print("demo: the faulty release was stopped at the canary; every device serves the healthy "
          f"model ({releases})" if ok else "demo: unexpected outcome, see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
