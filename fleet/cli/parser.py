"""The ``edgefleet`` parser: every command, its options, help texts and examples.

Only argparse is imported here so that ``edgefleet --help`` answers at once; each
subcommand names its handler as "module:function" and ``fleet.cli.main`` imports that
module only when the subcommand runs. Given the command line, ``build_parser`` fills in only
the commands it can reach.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from fleet.cli.main import EXIT_USAGE

_RAW = argparse.RawDescriptionHelpFormatter

MAIN_EPILOG = """\
examples:
  edgefleet keys init ./keys
  edgefleet bundle build model.onnx --name detector --version 1.2.0 --keys ./keys -o detector.bundle
  edgefleet bundle verify detector.bundle --trust ./keys/root.json
  edgefleet serve --keys ./keys
  edgefleet bundle upload detector.bundle
  edgefleet rollout create rollout.toml --start
  edgefleet rollout watch 3

Operator commands reach the fleet at --fleet (env EDGEFLEET_URL, default
http://127.0.0.1:8080) with --token (env EDGEFLEET_TOKEN, else ./fleet-data/admin.token).
"""


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line error format (exit 2 stays argparse's usage code)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"edgefleet: error: {message}; see '{self.prog} --help'\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _release_number(text: str) -> int:
    from shared.release import ReleaseRangeError, validate_release

    try:
        return validate_release(_positive_int(text))
    except ReleaseRangeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be zero or a positive number")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port {value} is above 65535")
    return value


def _fleet_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fleet connection")
    g.add_argument("--fleet", metavar="URL", default=None,
                   help="fleet API URL (env EDGEFLEET_URL; default http://127.0.0.1:8080)")
    g.add_argument("--token", metavar="T", default=None,
                   help="operator token (env EDGEFLEET_TOKEN; default: ./fleet-data/admin.token if present)")
    g.add_argument("--http-timeout", metavar="S", type=_positive_float, default=30.0,
                   help="seconds to wait for each HTTP answer (default 30)")


class _Skipped:
    """Stands for a parser this command line cannot reach: every call is a no-op, so the
    parser-building code below runs unchanged without building what argv does not use."""

    def __getattr__(self, name: str) -> Any:
        return self._nothing

    def _nothing(self, *args: Any, **kwargs: Any) -> _Skipped:
        return self


class _Commands:
    """A set of subcommands and its place in the tree (``path``). Every name is registered
    (help listings and "invalid choice" answers are the same), but only a command on the
    path argv names (``reach``; None: all of them) gets its options, subcommands and texts:
    building all 45 parsers took ~10 ms of each run."""

    def __init__(self, action: argparse._SubParsersAction, path: tuple[str, ...],
                 reach: tuple[str, ...] | None) -> None:
        self.action, self.path, self.reach = action, path, reach

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser | Any:
        path = (*self.path, name)
        if self.reach is None or path[:len(self.reach)] == self.reach[:len(path)]:
            return self.action.add_parser(name, **kwargs)
        self.action.add_parser(name, help=kwargs.get("help"))
        return _Skipped()

    def group(self, parser: argparse.ArgumentParser | Any, name: str, dest: str) -> _Commands | Any:
        """The subcommands of group ``name`` (``parser``, from ``add_parser``)."""
        if isinstance(parser, _Skipped):
            return parser
        action = parser.add_subparsers(dest=dest, metavar="COMMAND", parser_class=_Parser)
        return _Commands(action, (*self.path, name), self.reach)


def _reach(argv: Sequence[str] | None) -> tuple[str, ...] | None:
    """The command words argv starts with (at most two), or None to build every parser."""
    if argv is None or not argv or argv[0].startswith("-"):
        return None
    words = [argv[0]]
    if len(argv) > 1 and not argv[1].startswith("-"):
        words.append(argv[1])
    return tuple(words)


def _sub(parent: _Commands | Any, name: str, handler: str, help_: str, *,
         description: str | None = None, epilog: str | None = None, fleet: bool = False
         ) -> argparse.ArgumentParser | Any:
    p = parent.add_parser(name, help=help_, description=description or help_, epilog=epilog,
                          formatter_class=_RAW)
    p.set_defaults(handler=handler)
    if fleet:
        _fleet_options(p)
    return p


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given ``argv``, only the commands it can reach are filled in (the
    others are there by name and help line), which parses ``argv`` the same way."""
    parser = _Parser(
        prog="edgefleet",
        description="Operate an edgefleet: signing keys, model bundles, the fleet service, "
                    "devices and staged rollouts.",
        epilog=MAIN_EPILOG,
        formatter_class=_RAW,
    )
    parser.add_argument("--version", action="version", version="edgefleet 0.1.0")
    commands = _Commands(parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser),
                         (), _reach(argv))

    # -- serve ----------------------------------------------------------------------
    p = _sub(commands, "serve", "fleet.cli.serve:run", "run the fleet service (API, ingester, rollouts)",
             description="Run the fleet service: HTTP API, MQTT ingestion and the rollout controller.\n"
                         "Defaults: SQLite in the data dir and an embedded MQTT broker; production\n"
                         "passes --database-url postgresql://... and --mqtt-url mqtt://broker:1883.\n"
                         "Environment: EDGEFLEET_DATABASE_URL, EDGEFLEET_MQTT_URL, EDGEFLEET_DATA_DIR,\n"
                         "EDGEFLEET_ADMIN_TOKEN; options win over the environment.",
             epilog="examples:\n"
                    "  edgefleet serve --keys ./keys\n"
                    "  edgefleet serve --host 0.0.0.0 --port 8080 --mqtt-url mqtt://broker:1883 \\\n"
                    "      --database-url postgresql+psycopg://fleet@db/fleet --keys /etc/edgefleet/keys\n")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, help="HTTP port (default 8080)")
    p.add_argument("--database-url", metavar="URL", help="SQLAlchemy URL (default sqlite in --data-dir)")
    p.add_argument("--mqtt-url", metavar="URL",
                   help="external broker, e.g. mqtt://broker:1883 (default: start an embedded broker)")
    p.add_argument("--mqtt-port", type=_port, metavar="P",
                   help="port of the embedded broker (env EDGEFLEET_EMBEDDED_MQTT_PORT; default 1883)")
    p.add_argument("--data-dir", metavar="DIR", help="database, tokens and blobs (default ./fleet-data)")
    p.add_argument("--keys", metavar="DIR",
                   help="key directory from 'edgefleet keys init': uploads are verified against its\n"
                        "root.json and fleet-ordered rollbacks are signed with its signing keys")
    p.add_argument("--admin-token", metavar="T",
                   help="operator token (default: generated once, written to DATA_DIR/admin.token);\n"
                        "shows in ps: prefer --admin-token-file or EDGEFLEET_ADMIN_TOKEN")
    p.add_argument("--enrollment-token", metavar="T",
                   help="token devices enroll with (default: generated, DATA_DIR/enroll.token);\n"
                        "shows in ps: prefer --enrollment-token-file or EDGEFLEET_ENROLLMENT_TOKEN")
    if not isinstance(p, _Skipped):
        from fleet.cli.serve import add_serve_options

        add_serve_options(p)

    p = _sub(commands, "completion", "fleet.cli.completion:run", "print the shell completion script",
             epilog="examples:\n  edgefleet completion bash > /etc/bash_completion.d/edgefleet\n"
                    "  source <(edgefleet completion bash)\n")
    p.add_argument("shell", choices=("bash",), help="the shell (zsh: autoload bashcompinit first)")

    # -- db -------------------------------------------------------------------------
    db = commands.add_parser("db", help="the fleet database schema (migrations)",
                             description="The fleet database schema, managed by Alembic migrations.")
    db_cmds = commands.group(db, "db", "db_command")
    db.set_defaults(handler=None, group=db)
    p = _sub(db_cmds, "upgrade", "fleet.cli.db:upgrade", "upgrade the database to the newest schema",
             description="Apply every pending migration (edgefleet serve does this on start too).",
             epilog="examples:\n  edgefleet db upgrade --database-url postgresql://fleet@db/fleet\n"
                    "  edgefleet db upgrade --data-dir ./fleet-data     # the default SQLite database\n")
    p.add_argument("--database-url", metavar="URL",
                   help="SQLAlchemy URL (env EDGEFLEET_DATABASE_URL; default sqlite in --data-dir)")
    p.add_argument("--data-dir", metavar="DIR", help="data dir of the default SQLite database")
    p = _sub(db_cmds, "current", "fleet.cli.db:current", "show the database's schema revision",
             epilog="example:\n  edgefleet db current --database-url postgresql://fleet@db/fleet\n")
    p.add_argument("--database-url", metavar="URL", help="SQLAlchemy URL (env EDGEFLEET_DATABASE_URL)")
    p.add_argument("--data-dir", metavar="DIR", help="data dir of the default SQLite database")

    # -- token ----------------------------------------------------------------------
    token = commands.add_parser("token", help="operator API tokens with scopes",
                                description="Operator API tokens. Scopes: read (look), deploy (upload\n"
                                            "bundles, operate rollouts), admin (manage tokens; implies all).",
                                formatter_class=_RAW)
    token_cmds = commands.group(token, "token", "token_command")
    token.set_defaults(handler=None, group=token)
    p = _sub(token_cmds, "create", "fleet.cli.tokens:create", "create a token (shown once)", fleet=True,
             epilog="examples:\n  edgefleet token create --scope read --name grafana\n"
                    "  edgefleet token create --scope read,deploy --name ci\n")
    p.add_argument("--scope", required=True, metavar="S[,S]", help="comma-separated: read, deploy, admin")
    p.add_argument("--name", default="", help="what the token is for (shown in 'token list')")
    p.add_argument("--json", action="store_true", help="print the fleet's answer as JSON")
    p = _sub(token_cmds, "list", "fleet.cli.tokens:list_tokens", "list tokens (never their secrets)",
             fleet=True, epilog="example:\n  edgefleet token list\n")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _sub(token_cmds, "revoke", "fleet.cli.tokens:revoke", "revoke a token at once", fleet=True,
             epilog="example:\n  edgefleet token revoke 4\n")
    p.add_argument("id", type=_positive_int, metavar="ID", help="token id (from 'token list')")

    # -- keys -----------------------------------------------------------------------
    keys = commands.add_parser("keys", help="signing keys and the trust root",
                               description="Signing keys and the trust root devices pin.")
    keys_cmds = commands.group(keys, "keys", "keys_command")
    keys.set_defaults(handler=None, group=keys)
    p = _sub(keys_cmds, "init", "fleet.cli.keys:init", "create root keys, signing keys and root.json",
             description="Create a key directory: offline root keys (a threshold of them signs the\n"
                         "trust root and any successor), online signing keys delegated by the root,\n"
                         "and root.json, the trust root every device pins. Private keys are 0600.",
             epilog="examples:\n"
                    "  edgefleet keys init ./keys                          # 2-of-3 root, one signing key\n"
                    "  edgefleet keys init ./keys --root-keys 5 --threshold 3 --expires-days 730\n")
    p.add_argument("directory", metavar="DIR", help="directory to create (must not hold a root.json)")
    p.add_argument("--root-keys", type=_positive_int, default=3, metavar="N", help="root keys (default 3)")
    p.add_argument("--threshold", type=_positive_int, default=None, metavar="T",
                   help="root keys needed to sign a root (default 2, or 1 with a single root key)")
    p.add_argument("--signing-keys", type=_positive_int, default=1, metavar="N",
                   help="online signing keys (default 1)")
    p.add_argument("--expires-days", type=_positive_float, default=365.0, metavar="D",
                   help="days until the root and its delegation expire (default 365)")
    p = _sub(keys_cmds, "rotate", "fleet.cli.keys:rotate", "replace the root keys (root N+1)",
             description="Generate new root keys and write root N+1, signed by a threshold of the\n"
                         "current root keys and of the new ones. Delegations carry over. Devices walk\n"
                         "DIR/roots/ from the root they pin; old root keys move to DIR/retired/.",
             epilog="examples:\n"
                    "  edgefleet keys rotate ./keys\n"
                    "  edgefleet keys rotate ./keys --root-keys 5 --threshold 3\n")
    p.add_argument("directory", metavar="DIR", help="key directory holding the current root keys")
    p.add_argument("--root-keys", type=_positive_int, default=3, metavar="N",
                   help="new root keys (default 3)")
    p.add_argument("--threshold", type=_positive_int, default=2, metavar="T",
                   help="new root keys needed to sign a root (default 2)")
    p.add_argument("--expires-days", type=_positive_float, default=365.0, metavar="D",
                   help="days until the new root expires (default 365)")
    p = _sub(keys_cmds, "delegate", "fleet.cli.keys:delegate", "add online signing keys for some models",
             description="Create (or replace) delegation NAME: new online signing keys allowed to sign\n"
                         "only models matching --models, with their own expiry. Writes root N+1,\n"
                         "signed by the root keys. Sign with: edgefleet bundle build --delegation NAME.",
             epilog="examples:\n"
                    "  edgefleet keys delegate ./keys --name vision --models 'detector-*' --models 'ocr-*'\n"
                    "  edgefleet keys delegate ./keys --name online --models '*' --expires-days 30\n")
    p.add_argument("directory", metavar="DIR", help="key directory holding the root keys")
    p.add_argument("--name", required=True, help="delegation name ('online' is the default one)")
    p.add_argument("--models", action="append", required=True, metavar="PATTERN",
                   help="model names it may sign (shell patterns; repeat for several)")
    p.add_argument("--keys", type=_positive_int, default=1, metavar="N", help="online keys (default 1)")
    p.add_argument("--threshold", type=_positive_int, default=1, metavar="T",
                   help="keys needed to sign a manifest (default 1)")
    p.add_argument("--expires-days", type=_positive_float, default=90.0, metavar="D",
                   help="days until the delegation expires (default 90)")

    # -- bundle ---------------------------------------------------------------------
    bundle = commands.add_parser("bundle", help="build, inspect, verify and upload model bundles",
                                 description="Signed model bundles: build, inspect, verify, upload, list.")
    bundle_cmds = commands.group(bundle, "bundle", "bundle_command")
    bundle.set_defaults(handler=None, group=bundle)
    p = _sub(bundle_cmds, "build", "fleet.cli.bundle:build", "build and sign a bundle from an ONNX model",
             description="Build a signed single-file bundle from an ONNX model: read its signature,\n"
                         "make golden vectors by running it, record baseline input statistics, sign\n"
                         "the manifest with the signing keys of --keys and write OUT atomically.",
             epilog="The release number must grow with every bundle of a model (devices refuse older\n"
                    "or reused numbers). The default is the build time in milliseconds, but at least\n"
                    "one above the highest release known for the model: in the release ledger\n"
                    "(--ledger, default KEYS/releases.json; locked, so parallel builds differ) and,\n"
                    "with --fleet (or env EDGEFLEET_URL), in the fleet's registry. An explicit\n"
                    "--release that is not above those is refused with the number to use.\n\n"
                    "examples:\n"
                    "  edgefleet bundle build model.onnx --name detector --version 1.2.0 \\\n"
                    "      --keys ./keys -o detector.bundle\n"
                    "  edgefleet bundle build model.onnx --name detector --version 1.3.0 --release 13 \\\n"
                    "      --golden golden.npz --atol 1e-3 --quantize dynamic --keys ./keys -o d13.bundle\n"
                    "  edgefleet bundle build silero_vad.onnx --name vad --version 6.2.3 \\\n"
                    "      --validation vad.npz --quantize dynamic --fix-input sr=16000 \\\n"
                    "      --keys ./keys -o vad.bundle\n"
                    "  edgefleet bundle build yolo.onnx --name det --version 2.0.0 --quantize static \\\n"
                    "      --calibration cal.npz --validation val.npz --detections output0:1:4:0.25 \\\n"
                    "      --keys ./keys -o det.bundle\n\n"
                    "samples files (--golden, --calibration, --validation) are .npz keyed by input name:\n"
                    "  every array at its input's own rank is ONE feed, exactly as the model takes it\n"
                    "  (a stateful model: input [1, 512], state [2, 1, 128], sr as a 0-d array); when\n"
                    "  every input's first axis is a dynamic batch axis, each of its rows is a sample;\n"
                    "  every array with one more leading axis stacks samples on it (input [N, 1, 512],\n"
                    "  state [N, 2, 1, 128], sr [N]). --golden takes one feed.\n")
    p.add_argument("model", metavar="MODEL", help="ONNX model file")
    p.add_argument("--name", required=True, help="model name: lowercase letters, digits, '.', '_', '-'")
    p.add_argument("--version", required=True, metavar="LABEL", help="human version label, e.g. 1.2.0")
    p.add_argument("--release", type=_release_number, metavar="N",
                   help="release number (default: build time in ms, above every known release)")
    p.add_argument("--ledger", metavar="FILE",
                   help="release ledger: highest release built per model (default KEYS/releases.json)")
    p.add_argument("--fleet", metavar="URL", default=None,
                   help="also number above the fleet's highest release of the model\n"
                        "(env EDGEFLEET_URL; default: the ledger only)")
    p.add_argument("--token", metavar="T", default=None,
                   help="operator token for --fleet (env EDGEFLEET_TOKEN; default ./fleet-data/admin.token)")
    p.add_argument("--offline", action="store_true",
                   help="do not ask the fleet even when EDGEFLEET_URL is set (the ledger only)")
    p.add_argument("--golden", metavar="FILE.npz",
                   help="golden inputs: arrays keyed by input name, or a bundle golden.npz with in.<name>\n"
                        "(default: the first validation/calibration sample, else made from the signature;\n"
                        "a model with dynamic axes or scalar inputs usually needs it)")
    p.add_argument("--atol", type=_non_negative_float, default=1e-4, help="golden absolute tolerance (1e-4)")
    p.add_argument("--rtol", type=_non_negative_float, default=1e-3, help="golden relative tolerance (1e-3)")
    p.add_argument("--quantize", choices=("none", "dynamic", "static"), default="none",
                   help="int8 quantization; the build refuses past the accuracy bounds, and says\n"
                        "which operators it found when int8 does not apply to the model (default none)")
    p.add_argument("--calibration", metavar="FILE.npz",
                   help="calibration inputs keyed by input name (samples files: see below)")
    p.add_argument("--max-error", type=_non_negative_float, default=0.05, metavar="E",
                   help="largest relative L2 error of the quantized model, per output and per channel\n"
                        "along its feature axis: the worst decides (default 0.05)")
    p.add_argument("--fix-input", action="append", default=[], metavar="NAME=VALUE",
                   help="fix a scalar input for this deployment (e.g. sr=16000): the graph is\n"
                        "specialised on it (If nodes folded to the taken branch) before quantizing;\n"
                        "recorded in the manifest, devices refuse other values (repeatable)")
    p.add_argument("--class-scores", metavar="OUTPUT[:AXIS[:FIRST]]",
                   help="where class scores are, for the top-1 agreement of the quantized model:\n"
                        "the output, its class axis (default -1) and first class channel (default 0;\n"
                        "4 for a detector row of 4 box coordinates then the classes)")
    p.add_argument("--min-argmax-agreement", type=_non_negative_float, metavar="F",
                   help="refuse a quantized model whose top-1 agreement over the class axis is below F")
    p.add_argument("--detections", action="append", default=[], metavar="OUTPUT[:AXIS[:FIRST[:THRESHOLD]]]",
                   help="an output holding detections, for the share the quantized model keeps:\n"
                        "its class axis (default -1), first class channel (default 0; the channels\n"
                        "before are box coordinates) and score threshold (default 0.25). An anchor\n"
                        "whose best class score is >= THRESHOLD in the float model is kept when it is\n"
                        "so in the quantized one too, with the same top class (repeatable: one per\n"
                        "output; the first also sets the top-1 layout when --class-scores is not given)")
    p.add_argument("--min-detections-kept", type=_non_negative_float, default=0.9, metavar="F",
                   help="refuse a quantized model that keeps less than this share of the float\n"
                        "model's detections in any --detections output (default 0.9)")
    p.add_argument("--expires-days", type=_positive_float, default=90.0, metavar="D",
                   help="days until the manifest expires (default 90)")
    p.add_argument("--min-agent-version", default="0.1.0", metavar="X.Y.Z",
                   help="oldest agent that may install it (default 0.1.0)")
    p.add_argument("--description", default="", help="free text stored in the manifest")
    p.add_argument("--keys", required=True, metavar="DIR", help="key directory from 'edgefleet keys init'")
    p.add_argument("--delegation", default="online", metavar="NAME",
                   help="sign with this delegation's keys (default: online)")
    p.add_argument("--validation", metavar="FILE.npz",
                   help="inputs the quantized model is measured on against the float one\n"
                        "(samples files: see below)")
    p.add_argument("-o", "--out", required=True, metavar="OUT.bundle", help="bundle file to write")

    p = _sub(bundle_cmds, "inspect", "fleet.cli.bundle:inspect", "show a bundle's manifest",
             description="Show the manifest of a bundle file. Without --trust nothing is verified and\n"
                         "the output says so; with --trust the signatures, scope and expiry are checked.",
             epilog="examples:\n  edgefleet bundle inspect detector.bundle\n"
                    "  edgefleet bundle inspect detector.bundle --trust ./keys/root.json --json\n")
    p.add_argument("file", metavar="FILE", help="single-file bundle")
    p.add_argument("--trust", metavar="ROOT.json", help="verify against this trust root")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = _sub(bundle_cmds, "verify", "fleet.cli.bundle:verify", "verify a bundle completely",
             description="Verify a bundle as a device would: the envelope against the trust root\n"
                         "(signatures, delegation scope, expiry), then every archive member (safe\n"
                         "names, regular files, listed, exact sizes) and every file's SHA-256.\n"
                         "Exit 0 when all holds, else 1 with the reason code.",
             epilog="example:\n  edgefleet bundle verify detector.bundle --trust ./keys/root.json\n")
    p.add_argument("file", metavar="FILE", help="single-file bundle")
    p.add_argument("--trust", required=True, metavar="ROOT.json", help="trust root to verify against")

    p = _sub(bundle_cmds, "upload", "fleet.cli.operator:bundle_upload", "upload a bundle to the fleet",
             description="Upload a single-file bundle; the fleet verifies it against its trust root.",
             epilog="example:\n  edgefleet bundle upload detector.bundle --fleet http://fleet:8080\n",
             fleet=True)
    p.add_argument("file", metavar="FILE", help="single-file bundle")
    p.add_argument("--json", action="store_true", help="print the fleet's answer as JSON")

    p = _sub(bundle_cmds, "list", "fleet.cli.operator:bundle_list", "list bundles on the fleet",
             fleet=True, epilog="example:\n  edgefleet bundle list\n")
    p.add_argument("--json", action="store_true", help="print JSON")

    # -- device ---------------------------------------------------------------------
    device = commands.add_parser("device", help="devices enrolled in the fleet",
                                 description="Devices enrolled in the fleet.")
    device_cmds = commands.group(device, "device", "device_command")
    device.set_defaults(handler=None, group=device)
    p = _sub(device_cmds, "list", "fleet.cli.operator:device_list",
             "list devices: labels, online, last seen, active releases", fleet=True,
             epilog="example:\n  edgefleet device list\n")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _sub(device_cmds, "show", "fleet.cli.devices:show", "one device: status, labels, identity",
             fleet=True, epilog="example:\n  edgefleet device show cam-01\n")
    p.add_argument("device_id", metavar="DEVICE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _sub(device_cmds, "relabel", "fleet.cli.devices:relabel", "replace (or --merge) a device's labels",
             fleet=True, epilog="examples:\n  edgefleet device relabel cam-01 site=paris ring=canary\n"
                                "  edgefleet device relabel cam-01 --merge ring=main --remove old\n")
    p.add_argument("device_id", metavar="DEVICE")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--merge", action="store_true", help="keep the labels not named")
    p.add_argument("--remove", action="append", metavar="KEY", help="drop this label (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _sub(device_cmds, "revoke", "fleet.cli.devices:revoke",
             "revoke a device: its fleet and broker credentials stop working at once (admin)",
             fleet=True, epilog="example:\n  edgefleet device revoke cam-01\n"
                                "A revoked device enrolls again only after 'edgefleet device approve'.\n")
    p.add_argument("device_id", metavar="DEVICE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _sub(device_cmds, "delete", "fleet.cli.devices:delete",
             "delete a device (cut off like a revoke); its id may enroll again as new (admin)",
             fleet=True, epilog="example:\n  edgefleet device delete cam-01 --yes\n")
    p.add_argument("device_id", metavar="DEVICE")
    p.add_argument("--yes", action="store_true", help="really delete")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _sub(device_cmds, "rotate", "fleet.cli.devices:rotate",
             "ask a device (or --all) to rotate its API and broker credentials (admin)",
             fleet=True,
             epilog="examples:\n  edgefleet device rotate cam-01\n  edgefleet device rotate --all\n"
                    "Each device fetches new credentials with its current ones on its next pull;\n"
                    "its old API credential stays valid for an hour (docs/install.md).\n")
    p.add_argument("device_id", metavar="DEVICE", nargs="?")
    p.add_argument("--all", action="store_true", help="every device that is not revoked")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _sub(device_cmds, "approve", "fleet.cli.devices:approve",
             "allow one re-enrollment of a known or revoked device with an enrollment token (admin)",
             fleet=True, epilog="example:\n  edgefleet device approve cam-01 --valid 3600\n"
                                "For a device that lost its state (and so its credential).\n")
    p.add_argument("device_id", metavar="DEVICE")
    p.add_argument("--valid", dest="valid_s", type=_positive_float, default=3600.0, metavar="S",
                   help="seconds the approval lasts (default 3600)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = _sub(device_cmds, "certificates", "fleet.cli.certificates:certificates",
             "the client certificates issued to a device: serial, expiry, revocation",
             fleet=True, epilog="example:\n  edgefleet device certificates cam-01\n")
    p.add_argument("device_id", metavar="DEVICE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _sub(device_cmds, "revoke-certificates", "fleet.cli.certificates:revoke_certificates",
             "revoke a device's certificates: CRL, broker reload, session ended (admin)",
             fleet=True, epilog="example:\n  edgefleet device revoke-certificates cam-01\n"
                                "The device stays trusted and gets a new key and certificate;\n"
                                "'edgefleet device revoke' cuts it off entirely.\n")
    p.add_argument("device_id", metavar="DEVICE")
    p.add_argument("--json", action="store_true", help="print JSON")

    # -- enrollment-token -----------------------------------------------------------
    etoken = commands.add_parser("enrollment-token", help="tokens devices enroll with",
                                 description="Enrollment tokens: they only create new devices, may\n"
                                             "expire and be limited in uses. Rotate: create a new one,\n"
                                             "revoke the old.",
                                 formatter_class=_RAW)
    etoken_cmds = commands.group(etoken, "enrollment-token", "etoken_command")
    etoken.set_defaults(handler=None, group=etoken)
    p = _sub(etoken_cmds, "create", "fleet.cli.devices:token_create",
             "create an enrollment token (shown once)", fleet=True,
             epilog="example:\n  edgefleet enrollment-token create --name line-3 --expires-in 86400 "
                    "--max-uses 50\n")
    p.add_argument("--name", default="", help="what the token is for")
    p.add_argument("--expires-in", type=_positive_float, metavar="S", help="seconds until it expires")
    p.add_argument("--max-uses", type=_positive_int, metavar="N", help="devices it may enroll")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _sub(etoken_cmds, "list", "fleet.cli.devices:token_list",
             "list enrollment tokens (never their secrets)", fleet=True,
             epilog="example:\n  edgefleet enrollment-token list\n")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _sub(etoken_cmds, "revoke", "fleet.cli.devices:token_revoke",
             "revoke an enrollment token (enrolled devices are not touched)", fleet=True,
             epilog="example:\n  edgefleet enrollment-token revoke 2\n")
    p.add_argument("id", type=_positive_int, metavar="ID", help="token id (from 'enrollment-token list')")

    # -- rollout --------------------------------------------------------------------
    rollout = commands.add_parser("rollout", help="staged rollouts with health gates",
                                  description="Staged rollouts: create, start, watch, pause, roll back.")
    rollout_cmds = commands.group(rollout, "rollout", "rollout_command")
    rollout.set_defaults(handler=None, group=rollout)
    p = _sub(rollout_cmds, "create", "fleet.cli.operator:rollout_create", "create a rollout from a spec file",
             description="Create a rollout from a JSON or TOML spec (docs/architecture.md, 'Rollout spec').",
             epilog="example spec (rollout.toml):\n"
                    '  name = "detector r12 to lab"\n'
                    "  bundle_id = 3\n"
                    '  selector = { site = "lab" }\n'
                    '  on_gate_failure = "rollback"\n'
                    "  [gates]\n"
                    "  max_error_rate = 0.05\n"
                    "  min_inferences = 100\n"
                    "  [[stages]]\n"
                    '  name = "canary"\n'
                    '  selector = { ring = "canary" }\n'
                    "  min_devices = 1\n"
                    "  bake_seconds = 60\n"
                    "  [[stages]]\n"
                    '  name = "all"\n'
                    "  percent = 100\n\n"
                    "examples:\n  edgefleet rollout create rollout.toml --start\n"
                    "  edgefleet rollout create rollout.json\n", fleet=True)
    p.add_argument("spec", metavar="SPEC", help="rollout spec, .json or .toml")
    p.add_argument("--start", action="store_true", help="start it right away")
    p.add_argument("--reissue", action="store_true",
                   help="when some devices accepted a release above the bundle's, sign the same\n"
                        "content again as a new, higher release and roll that out (else refused)")
    p.add_argument("--json", action="store_true", help="print the fleet's answer as JSON")

    p = _sub(rollout_cmds, "list", "fleet.cli.operator:rollout_list", "list rollouts", fleet=True,
             epilog="example:\n  edgefleet rollout list\n")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = _sub(rollout_cmds, "status", "fleet.cli.operator:rollout_status",
             "stages, devices, gate figures, reason and history of a rollout", fleet=True,
             epilog="examples:\n  edgefleet rollout status 3\n"
                    "  edgefleet rollout status 3 --json | jq .state\n")
    p.add_argument("id", type=_positive_int, metavar="ID", help="rollout id")
    p.add_argument("--json", action="store_true", help="print the fleet's answer as JSON")

    for action, text in (
        ("start", "start a created rollout"),
        ("pause", "pause a running rollout (devices keep what they have)"),
        ("resume", "resume a paused rollout"),
        ("approve", "approve the stage that passed and waits for approval; it goes on to the next"),
        ("abort", "abort: stop assigning; devices keep what they have"),
        ("rollback", "roll back: re-issue each device's previous release under a higher number"),
    ):
        p = _sub(rollout_cmds, action, "fleet.cli.operator:rollout_action", text, fleet=True,
                 epilog=f"example:\n  edgefleet rollout {action} 3\n")
        p.add_argument("id", type=_positive_int, metavar="ID", help="rollout id")
        p.add_argument("--json", action="store_true", help="print the fleet's answer as JSON")
        p.set_defaults(action=action)

    p = _sub(rollout_cmds, "watch", "fleet.cli.operator:rollout_watch",
             "follow a rollout live until it ends",
             description="Follow a rollout, refreshing every second, until it succeeds, rolls back,\n"
                         "is aborted or fails. Exit 0 when it succeeded; 3 when it rolled back,\n"
                         "failed or was aborted; 1 on error or when --timeout passes first.",
             epilog="examples:\n  edgefleet rollout watch 3\n"
                    "  edgefleet rollout watch 3 --timeout 600 && echo released\n", fleet=True)
    p.add_argument("id", type=_positive_int, metavar="ID", help="rollout id")
    p.add_argument("--timeout", type=_positive_float, metavar="S", help="give up after S seconds")
    p.add_argument("--interval", type=_positive_float, default=1.0, metavar="S",
                   help="seconds between refreshes (default 1)")
    return parser
