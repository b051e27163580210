"""``edgefleet serve`` takes its secrets from files or the environment, never only from the
command line (issue 16): --*-file options, EDGEFLEET_*_FILE variables, a warning for each
secret given as an option, and a real fleet whose process list holds no token."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fleet.cli.main import build_parser
from fleet.cli.output import CliError
from fleet.cli.serve import settings_from_args
from fleet.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("EDGEFLEET_"):
            monkeypatch.delenv(key)


def secret(tmp_path: Path, name: str, value: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(value + "\n")
    path.chmod(mode)
    return path


def settings(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))  # type: ignore[no-any-return]


def test_secret_files_become_settings_without_warnings(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    s = settings("--data-dir", str(tmp_path),
                 "--admin-token-file", str(secret(tmp_path, "admin", "adm-secret")),
                 "--enrollment-token-file", str(secret(tmp_path, "enroll", "enr-secret")),
                 "--database-url", "postgresql+psycopg://fleet@db:5432/fleet",
                 "--database-password-file", str(secret(tmp_path, "db", "p@ss word/")),
                 "--mqtt-url", "mqtt://broker:1883",
                 "--mqtt-login-password-file", str(secret(tmp_path, "mqtt", "broker-secret")))
    assert (s.admin_token, s.enrollment_token) == ("adm-secret", "enr-secret")
    assert s.mqtt_password == "broker-secret"
    from sqlalchemy.engine import make_url

    url = make_url(s.database_url)  # type: ignore[arg-type]
    assert (url.username, url.password, url.host, url.database) == ("fleet", "p@ss word/", "db", "fleet")
    assert capsys.readouterr().err == ""


def test_secrets_given_as_options_still_work_with_a_warning(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    s = settings("--data-dir", str(tmp_path), "--admin-token", "adm", "--enrollment-token", "enr",
                 "--database-url", "postgresql://fleet:pw@db/fleet", "--mqtt-url", "mqtt://fleet:pw@broker")
    assert (s.admin_token, s.enrollment_token) == ("adm", "enr")
    err = capsys.readouterr().err
    for option, instead in (("--admin-token", "--admin-token-file"),
                            ("--enrollment-token", "--enrollment-token-file"),
                            ("--database-url", "--database-password-file"),
                            ("--mqtt-url", "--mqtt-login-password-file")):
        assert f"edgefleet serve: warning: {option} " in err and instead in err, err
    assert err.count("process list (ps)") == 4
    assert "adm" not in err.replace("admin", "") and ":pw@" not in err  # the warning shows no secret


def test_secret_files_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN_FILE", str(secret(tmp_path, "admin", "adm-env")))
    monkeypatch.setenv("EDGEFLEET_ENROLLMENT_TOKEN_FILE", str(secret(tmp_path, "enroll", "enr-env")))
    monkeypatch.setenv("EDGEFLEET_MQTT_LOGIN_PASSWORD_FILE", str(secret(tmp_path, "mqtt", "mq-env")))
    monkeypatch.setenv("EDGEFLEET_DATABASE_URL", "postgresql://fleet@db/fleet")
    monkeypatch.setenv("EDGEFLEET_DATABASE_PASSWORD_FILE", str(secret(tmp_path, "db", "db-env")))
    s = Settings.from_env()
    assert (s.admin_token, s.enrollment_token, s.mqtt_password) == ("adm-env", "enr-env", "mq-env")
    assert s.database_url == "postgresql://fleet:db-env@db/fleet"
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", "adm-plain")
    with pytest.raises(SettingsError, match="EDGEFLEET_ADMIN_TOKEN and EDGEFLEET_ADMIN_TOKEN_FILE are both"):
        Settings.from_env()
    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN")
    monkeypatch.setenv("EDGEFLEET_DATABASE_URL", "postgresql://fleet:inline@db/fleet")
    with pytest.raises(SettingsError, match="has a password already"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read"), ("", "is empty"), ("one\ntwo", "holds several lines")],
)
def test_unusable_secret_files_are_clear_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "admin"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CliError, match=f"--admin-token-file: .*{message}"):
        settings("--data-dir", str(tmp_path), "--admin-token-file", str(path))
    with pytest.raises(CliError, match="--admin-token and --admin-token-file are both given"):
        settings("--data-dir", str(tmp_path), "--admin-token", "x",
                 "--admin-token-file", str(secret(tmp_path, "ok", "y")))
    with pytest.raises(CliError, match="a database password needs a database URL"):
        settings("--data-dir", str(tmp_path), "--database-password-file", str(secret(tmp_path, "db", "z")))


def test_a_secret_file_others_can_read_is_warned_about(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    s = settings("--data-dir", str(tmp_path), "--admin-token-file",
                 str(secret(tmp_path, "admin", "a", 0o644)))
    assert s.admin_token == "a"
    assert "can be read by group or others; chmod 600 it" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_real_fleet_with_secret_files_shows_no_secret_in_its_command_line(tmp_path: Path) -> None:
    token = "admin-from-a-file-" + "k" * 20
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["PYTHONPATH"] = str(REPO)
    env["EDGEFLEET_ENROLLMENT_TOKEN_FILE"] = str(secret(tmp_path, "enroll", "enroll-from-env-file"))
    with open(tmp_path / "fleet.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli.main", "serve", "--port", str(port), "--mqtt-port",
             str(_free_port()), "--data-dir", str(tmp_path / "data"),
             "--admin-token-file", str(secret(tmp_path, "admin", token))],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "fleet.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "fleet.log").read_text()[-2000:]
            time.sleep(0.2)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert token.encode() not in cmdline and b"enroll-from-env-file" not in cmdline
        r = httpx.get(f"{url}/api/v1/tokens", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/api/v1/devices/enroll", timeout=10,
                       json={"device_id": "cam-1", "token": "enroll-from-env-file", "labels": {}})
        assert r.status_code == 201, r.text
        assert "warning" not in (tmp_path / "fleet.log").read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
