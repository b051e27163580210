"""The spool's redelivery stays exactly-once at the fleet: a real agent process killed (kill -9)
while sending, then started again, resends what its spool had not marked acknowledged (the
spool's bookkeeping is written about once a second); a real fleet ingester on Mosquitto stores
each (device, session, seq) once and counts the rest as duplicates."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from fleet.broker.client import parse_mqtt_url
from fleet.db.engine import make_engine
from fleet.db.models import Device, DeviceClaim, HealthReport
from fleet.ingest.ingester import Ingester
from shared.bundle.keyring import Keyring

from .conftest import Bundles
from .test_telemetry_outage import Subscriber, _agent


def test_an_agent_killed_while_sending_is_stored_once(
    mosquitto: Any, bundles: Bundles, keyring: Keyring, tmp_path: Path
) -> None:
    from agent.cli import main as cli_main

    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "dev-x"\nstate_dir = "{state}"\ntrust_root = "{keyring.root_path}"\n'
        f'[mqtt]\nurl = "{mosquitto.url}"\nhealth_interval_s = 0.1\nkeepalive_s = 5\n'
        '[api]\nlisten = "127.0.0.1:0"\n'
    )
    assert cli_main(["--config", str(cfg), "install", str(bundles.build(1))]) == 0
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    with Session(engine) as s:
        s.add(Device(id="dev-x", credential_hash="x" * 64))
        s.commit()
    ing = Ingester(engine, parse_mqtt_url(mosquitto.url), flush_interval_s=0.05)
    ing.start(wait=10)
    sub = Subscriber(mosquitto, "dev-x", client_id="watcher-x")
    log = tmp_path / "agent.log"
    try:
        for run in range(3):  # kill -9 mid-stream twice, then a clean stop
            proc = _agent(cfg, log)
            try:
                sub.wait(lambda got, n=(run + 1) * 6: len({m.seq for k, m in got if k == "health"}) >= n,
                         20, f"new health of run {run}")
                proc.send_signal(signal.SIGKILL if run < 2 else signal.SIGTERM)
                proc.wait(15)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        time.sleep(0.5)
        ing.flush()
        got = [m for k, m in sub.messages() if k == "health"]
        with Session(engine) as s:
            stored = s.exec(select(HealthReport.seq)).all()
            claim = s.get(DeviceClaim, "dev-x")
        delivered = {m.seq for m in got}
        assert {m.session for m in got} == {claim.session} and len(claim.session) == 8  # one install
        assert sorted(stored) == sorted(delivered), "each health stored once"
        assert len(stored) == len(set(stored))
        assert claim.duplicate == ing.stats.snapshot()["rejected"].get("duplicate", 0)
        resent = len(got) - len(delivered)  # what the watcher got twice: the restarts' resends
        assert claim.duplicate >= resent > 0, (claim.duplicate, resent)
        print(f"health delivered {len(got)} times, {len(delivered)} distinct, stored {len(stored)}, "
              f"duplicates counted {claim.duplicate}")
    finally:
        sub.close()
        ing.stop()
        engine.dispose()
    assert "Traceback" not in log.read_text()
