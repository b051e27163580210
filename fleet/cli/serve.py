"""``edgefleet serve``: settings from the environment and options, then the fleet server."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.cli.output import CliError

if TYPE_CHECKING:
    from fleet.settings import Settings

ROLE_CHOICES = ("all", "api", "ingester", "controller")


def add_serve_options(p: argparse.ArgumentParser) -> None:
    """The scale-out and operations options (the basic ones are in ``fleet.cli.main``)."""
    p.add_argument("--role", default="all", metavar="ROLE[,ROLE]",
                   help="what this process runs: all (default), or a comma list of api, ingester,\n"
                        "controller. Separate roles need PostgreSQL and --mqtt-url; run several of\n"
                        "each, only one controller acts at a time (the others wait to take over)")
    p.add_argument("--log-format", choices=("text", "json"), default=None,
                   help="log lines as text (default) or one JSON object per line (env EDGEFLEET_LOG_FORMAT)")
    p.add_argument("--debug", action="store_true",
                   help="on a start-up failure, show the traceback beside the one-line error")
    p.add_argument("--retention-days", type=float, default=None, metavar="D",
                   help="delete raw health reports older than D days (default 30; hourly rollups stay)")
    p.add_argument("--shared-subscription", choices=("auto", "on", "off"), default="auto",
                   help="ingesters share the telemetry stream via MQTT 5 $share/ subscriptions\n"
                        "(auto: on with --mqtt-url, off with the embedded broker)")
    p.add_argument("--public-mqtt-url", metavar="URL",
                   help="MQTT URL devices are told at enrollment (default: --mqtt-url)")
    secrets = p.add_argument_group(
        "secrets", "Secrets given as options show in the process list (ps): give them as files\n"
                   "(one line, mode 0600) or in the environment. A secret option still works, with a\n"
                   "warning.")
    secrets.add_argument("--admin-token-file", metavar="FILE",
                         help="the operator token (env EDGEFLEET_ADMIN_TOKEN or EDGEFLEET_ADMIN_TOKEN_FILE)")
    secrets.add_argument("--enrollment-token-file", metavar="FILE",
                         help="the enrollment token (env EDGEFLEET_ENROLLMENT_TOKEN[_FILE])")
    secrets.add_argument("--database-password-file", metavar="FILE",
                         help="the database password, put into --database-url (which then holds none;\n"
                              "env EDGEFLEET_DATABASE_PASSWORD[_FILE])")
    secrets.add_argument("--mqtt-login-password-file", metavar="FILE",
                         help="the fleet's broker password (env EDGEFLEET_MQTT_PASSWORD or\n"
                              "EDGEFLEET_MQTT_LOGIN_PASSWORD_FILE)")


SECRET_FILE_OPTIONS = (  # option attribute, the plain option it stands for (or None), setting
    ("admin_token_file", "admin_token", "admin_token"),
    ("enrollment_token_file", "enrollment_token", "enrollment_token"),
    ("database_password_file", None, "database_password"),
    ("mqtt_login_password_file", None, "mqtt_password"),
)


def secrets_from_args(args: argparse.Namespace) -> dict[str, str]:
    """Settings overrides read from the ``--*-file`` options; warnings for secrets given as
    options and for files others may read (stderr)."""
    from fleet.secrets import SecretError, command_line_warnings, open_to_others, read_secret_file
    from shared.logformat import LogFormatError, log_format_from

    try:
        log_format = log_format_from(getattr(args, "log_format", None))
    except LogFormatError as exc:
        raise CliError(str(exc)) from None
    out = {}
    for attr, plain, setting in SECRET_FILE_OPTIONS:
        path = getattr(args, attr, None)
        if not path:
            continue
        option = "--" + attr.replace("_", "-")
        if plain and getattr(args, plain, None):
            raise CliError(f"--{plain.replace('_', '-')} and {option} are both given; keep {option}")
        try:
            out[setting] = read_secret_file(Path(path), option)
        except SecretError as exc:
            raise CliError(str(exc)) from None
        if open_to_others(Path(path)):
            warn(f"{option} {path} can be read by group or others; chmod 600 it", log_format)
    given = {flag: getattr(args, flag[2:].replace("-", "_"), None)
             for flag in ("--admin-token", "--enrollment-token", "--database-url", "--mqtt-url",
                          "--public-mqtt-url")}
    for text in command_line_warnings(given):
        warn(text, log_format)
    return out


def warn(text: str, log_format: str = "text") -> None:
    """A start-up warning, before the logs are set up: in the chosen log format."""
    if log_format == "json":
        import logging

        from shared.logformat import JsonFormatter

        record = logging.LogRecord("fleet", logging.WARNING, __file__, 0, "edgefleet serve: %s", (text,),
                                   None)
        print(JsonFormatter().format(record), file=sys.stderr)
    else:
        print(f"edgefleet serve: warning: {text}", file=sys.stderr)


def parse_roles(text: str) -> tuple[bool, bool, bool]:
    """(run_api, run_ingester, run_controller) from ``all`` or a comma list."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in ROLE_CHOICES]
    if not names or unknown:
        raise CliError(f"--role {text!r}: use all, or a comma list of api, ingester, controller")
    if "all" in names:
        return True, True, True
    return "api" in names, "ingester" in names, "controller" in names


def settings_from_args(args: argparse.Namespace) -> Settings:
    from fleet.settings import Settings, SettingsError

    mqtt_port = args.mqtt_port
    if mqtt_port is None and os.environ.get("EDGEFLEET_EMBEDDED_MQTT_PORT"):
        text = os.environ["EDGEFLEET_EMBEDDED_MQTT_PORT"]
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise CliError(f"EDGEFLEET_EMBEDDED_MQTT_PORT={text!r} is not a port number")
        mqtt_port = int(text)
    keys_dir = Path(args.keys) if args.keys else None
    if keys_dir is not None and not (keys_dir / "root.json").is_file():
        raise CliError(
            f"--keys {keys_dir} holds no root.json; create one with 'edgefleet keys init {keys_dir}'"
        )
    run_api, run_ingester, run_controller = parse_roles(getattr(args, "role", "all") or "all")
    if getattr(args, "retention_days", None) is not None and not args.retention_days > 0:
        raise CliError(f"--retention-days {args.retention_days}: must be more than 0")
    shared = {"on": True, "off": False}.get(getattr(args, "shared_subscription", "auto"))
    secrets = secrets_from_args(args)
    try:
        settings = Settings.from_env(
            host=args.host,
            port=args.port,
            database_url=args.database_url,
            mqtt_url=args.mqtt_url,
            embedded_mqtt_port=mqtt_port,
            data_dir=Path(args.data_dir) if args.data_dir else None,
            keys_dir=keys_dir,
            admin_token=secrets.pop("admin_token", args.admin_token),
            enrollment_token=secrets.pop("enrollment_token", args.enrollment_token),
            run_api=run_api,
            run_ingester=run_ingester,
            run_controller=run_controller,
            log_format=getattr(args, "log_format", None),
            retention_days=getattr(args, "retention_days", None),
            mqtt_shared_subscription=shared,
            public_mqtt_url=getattr(args, "public_mqtt_url", None),
            **secrets,
        )
    except SettingsError as exc:
        raise CliError(str(exc)) from None
    if settings.log_format not in ("text", "json"):
        raise CliError(f"log format {settings.log_format!r}: use text or json")
    if not all((run_api, run_ingester, run_controller)) and settings.mqtt_url is None:
        raise CliError(
            f"--role {args.role}: a fleet split into roles needs an external broker; pass --mqtt-url "
            "mqtt://broker:1883 (and a PostgreSQL --database-url for processes on several machines)"
        )
    return settings


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        from fleet.server import serve
    except ImportError as exc:
        raise CliError(f"the fleet server cannot be loaded ({exc}); install 'edgefleet[fleet]'") from None
    from fleet.startup import StartError

    try:
        result = serve(settings)
    except StartError as exc:
        if getattr(args, "debug", False):
            raise
        raise CliError(str(exc)) from None
    return int(result) if isinstance(result, int) else 0
