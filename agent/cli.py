"""``edgefleet-agent``: run the agent, install a bundle offline, predict, score files, show status.

Expected failures (bad config, refused bundle, corrupt state) print one line
``edgefleet-agent: error: <message>`` and exit non-zero; never a stack trace.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from shared.leanimport import import_msgspec_without_typing_extensions

# First, as every module below imports msgspec: without typing_extensions, ~1.5 ms of a start
# (shared/leanimport.py says why it is the same msgspec). The imports below follow a call:
# ruff: noqa: E402
import_msgspec_without_typing_extensions()

import msgspec
import numpy as np

from agent import __version__
from agent.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, AgentConfig, default_config_path, load_config
from agent.errors import ConfigError, InferenceError, InputError, StateError, UnknownModelError
from agent.runtime.batching import BatchPolicy
from agent.runtime.host import LoadedModel, ModelHost
from agent.runtime.registry import default_backends
from agent.update.blobs import BlobStore
from agent.update.installer import Installer
from agent.update.lifecycle import ReleaseRef
from agent.update.store import StateStore
from shared.errors import EdgefleetError

if TYPE_CHECKING:
    import argparse

PROG = "edgefleet-agent"
EXIT_ERROR = 1
EXIT_REFUSED = 3
EXIT_PARTIAL = 4  # score: some files failed, the others were scored


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json", "journal")


def build_parser() -> argparse.ArgumentParser:
    import argparse  # not for `run` in its usual forms (run_args): ~7 ms of a start with gettext

    p = argparse.ArgumentParser(
        prog=PROG,
        description="The edgefleet device agent: verified model updates, local inference, telemetry.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--config", "-c", type=Path, default=None,
                   help=f"agent config (TOML); default ${CONFIG_ENV} or {DEFAULT_CONFIG_PATH}")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                   help="log verbosity on stderr (default INFO)")
    p.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                   help="log lines as text (default), one JSON object per line (env EDGEFLEET_LOG_FORMAT), "
                   "or entries with fields to the systemd journal (text under systemd does this too)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the agent until SIGTERM (what the systemd unit starts)",
                   description="Serve the local API, follow the fleet's desired state, report telemetry.")
    inst = sub.add_parser(
        "install", help="verify, smoke-test and activate a single-file bundle (works offline)",
        description="Install a bundle file: verify signatures and policy, stage its files, load "
        "and smoke-test the model, then activate and commit it. The running agent must be stopped.",
    )
    inst.add_argument("bundle", type=Path, metavar="BUNDLE_FILE", help="a .bundle file (tar)")
    pred = sub.add_parser("predict", help="run the active release of a model on an .npz file",
                          description="Load the active release of NAME from state_dir and run it.")
    pred.add_argument("name", metavar="NAME", help="model name")
    pred.add_argument("--input", "-i", type=Path, required=True, metavar="IN.npz",
                      help="inputs: one array per model input name")
    pred.add_argument("--output", "-o", type=Path, required=True, metavar="OUT.npz",
                      help="where to write the outputs")
    sc = sub.add_parser(
        "score", help="score every .npz file of a directory with the active release (agent may run)",
        description="Load the active release of NAME from state_dir and run it on every file "
        "matching PATTERN in INPUT_DIR, writing one .npz of outputs per input (same relative name) "
        "to OUTPUT_DIR, atomically. Bad files are reported and skipped. Exit status 0 when every "
        f"file was scored, {EXIT_PARTIAL} when some failed.",
    )
    sc.add_argument("name", metavar="NAME", help="model name")
    sc.add_argument("--input-dir", type=Path, required=True, metavar="DIR",
                    help="directory of input .npz files (one array per model input name)")
    sc.add_argument("--output-dir", type=Path, required=True, metavar="OUT",
                    help="where to write the outputs (created if missing; not the input directory)")
    sc.add_argument("--pattern", default="*.npz",
                    help="glob of the input files under DIR (default '*.npz'; '**/*.npz' recurses)")
    tr = sub.add_parser(
        "trust", help="show the trust root, or walk it forward to newer roots (works offline)",
        description="The device's trust root is the pinned trust_root, walked forward through "
        "newer roots it accepted (state_dir/trust/). 'trust update' accepts root N+1 only when a "
        "threshold of root N's keys and of its own signed it. A running agent uses the new root "
        "after a restart.",
    )
    tr_sub = tr.add_subparsers(dest="trust_command", required=True, metavar="ACTION")
    tr_sub.add_parser("show", help="print the current root's version, keys and delegations")
    tr_up = tr_sub.add_parser("update", help="accept newer roots from files (e.g. keys/roots/*.root.json)")
    tr_up.add_argument("files", type=Path, nargs="+", metavar="ROOT.json")
    st = sub.add_parser("status", help="show each model's lifecycle state and releases, the enrollment, "
                        "and the fleet and broker connection state",
                        description="Print lifecycle state, active/previous release and last reason; "
                        "the enrollment; the fleet (reachable, last contact, last error) and the broker "
                        "(connected since, last error) as the running agent last saw them.")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("doctor", help="check config, trust root, disk, fleet, broker, clock: ok/FAIL and the fix",
                   description="One line per check, each failure with its fix; exit 0 when all pass. "
                   "Safe while the agent runs (it then leaves the broker login to the agent).")
    return p


_RUN_OPTIONS = {"--config": "config", "-c": "config", "--log-level": "log_level",
                "--log-format": "log_format"}


def run_args(argv: list[str]) -> SimpleNamespace | None:
    """``run`` with the global options in their usual spellings (``--config PATH``,
    ``--config=PATH``, ``-c PATH``, ``--log-level LEVEL``, ``--log-format FORMAT``, each at
    most once, before ``run``, nothing after it), parsed as argparse parses them; None for
    anything else, which argparse then parses (help, abbreviations, errors and their
    messages): the service's start does not load argparse and gettext nor build the parser
    (~7 ms of a start; docs/performance.md, agent cold start)."""
    if not argv or argv[-1] != "run":
        return None
    found: dict[str, str] = {}
    i, end = 0, len(argv) - 1
    while i < end:
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if eq and name.startswith("--"):
            i += 1
        elif i + 1 < end:
            name, value = arg, argv[i + 1]
            i += 2
        else:
            return None
        dest = _RUN_OPTIONS.get(name)
        # argparse reads a value that starts with "-" as an option, and refuses a repeat of none
        if dest is None or dest in found or not value or value.startswith("-"):
            return None
        found[dest] = value
    level, fmt = found.get("log_level", "INFO"), found.get("log_format")
    if level not in LOG_LEVELS or (fmt is not None and fmt not in LOG_FORMATS):
        return None
    config = found.get("config")
    # the fields parse_args gives for run
    return SimpleNamespace(config=Path(config) if config is not None else None, log_level=level,
                           log_format=fmt, command="run")


def _config(path: Path | None) -> AgentConfig:
    return load_config(path or default_config_path())


def _installer(config: AgentConfig) -> Installer:
    from agent.main import load_trust_root

    return Installer(
        store=StateStore(config.state_dir), blobs=BlobStore(config.state_dir), host=ModelHost(),
        trust_root=load_trust_root(config.trust_root, config.state_dir),
        backend=default_backends(threads=config.runtime.intra_op_threads),
    )


def cmd_trust(config: AgentConfig, args: argparse.Namespace | SimpleNamespace) -> int:
    from agent.update.truststore import TrustStore

    store = TrustStore(config.trust_root, config.state_dir)
    if args.trust_command == "update":
        blobs = []
        for path in args.files:
            try:
                blobs.append(Path(path).read_bytes())
            except OSError as exc:
                raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        root, accepted = store.update(blobs)
        if accepted:
            print(f"trust root now v{root.version} (accepted {', '.join(f'v{v}' for v in accepted)}); "
                  "restart a running agent to use it")
        else:
            print(f"trust root stays v{root.version}: nothing newer in the given files")
        return 0
    root = store.load()
    p = root.payload
    print(f"trust root v{root.version}, expires {p.expires}")
    print(f"  root keys: {len(p.root.keyids)}, threshold {p.root.threshold}")
    for d in p.delegations:
        print(f"  delegation {d.name}: {len(d.keyids)} key(s), threshold {d.threshold}, "
              f"models {d.models}, expires {d.expires}")
    return 0


def startup_done(gc_enabled: bool) -> None:
    """The agent serves: turn the cyclic collector back on (``main`` turned it off for the
    start). What the start created (~55,000 objects: modules, classes, the loaded models)
    moves straight to the oldest generation (``gc.freeze`` then ``gc.unfreeze``), not walked
    by the young collections the first requests would otherwise trigger (a collection of all
    of it takes ~15 ms). It stays collectable: the next full collection, as Python schedules
    it, frees what the start left unreachable (~800 objects, ~0.12 MB) and a model an update
    replaced, should it hang in a cycle."""
    if gc_enabled and not gc.isenabled():
        gc.freeze()  # every generation into the permanent one, the young counts reset
        gc.unfreeze()  # and back, into the oldest
        gc.enable()


def cmd_run(config: AgentConfig, level: str, log_format: str | None = None,
            config_path: Path | None = None, *, gc_enabled: bool = True) -> int:
    from agent.logsetup import setup_logging
    from agent.main import Agent
    from shared.bundle import sigcheck
    from shared.logformat import LogFormatError, log_format_from

    try:
        chosen = "journal" if log_format == "journal" else log_format_from(log_format)
        setup_logging(level, chosen, device_id=config.device_id)
    except LogFormatError as exc:
        raise CliError(str(exc)) from None
    # The resident agent checks signatures in a child process, so that cryptography's
    # OpenSSL (~7.6 MB RSS) is never loaded into it (shared/bundle/sigcheck.py).
    sigcheck.use_child_process(True)
    agent = Agent(config)
    agent.config_path = config_path
    return agent.run(started=lambda: startup_done(gc_enabled))


def cmd_install(config: AgentConfig, bundle: Path) -> int:
    if not bundle.is_file():
        raise CliError(f"bundle file {bundle} does not exist")
    installer = _installer(config)
    installer.store.acquire()
    try:
        try:
            rec = installer.install_file(bundle, trial=False)
        except EdgefleetError as exc:
            raise CliError(f"refused ({exc.code}): {exc}", EXIT_REFUSED) from None
    finally:
        installer.store.release()
    assert rec.active is not None
    print(f"installed {rec.name} release {rec.active.release} (version {rec.active.version}), "
          f"digest {rec.active.digest[:12]}; state {rec.state}")
    return 0


def _load_active(config: AgentConfig, name: str) -> LoadedModel:
    """The active release of ``name`` from state_dir, loaded (the running agent may hold it too)."""
    installer = _installer(config)
    rec = installer.store.load(name)
    if rec is None or rec.active is None:
        raise CliError(f"no active release of {name!r} in {config.state_dir}; install a bundle first")
    try:
        return installer.load_release(name, rec.active)
    except EdgefleetError as exc:
        raise CliError(f"cannot load {name} r{rec.active.release} ({exc.code}): {exc}") from None


def cmd_predict(config: AgentConfig, name: str, src: Path, dest: Path) -> int:
    loaded = _load_active(config, name)
    host = ModelHost()
    host.swap(loaded)
    try:
        with np.load(src, allow_pickle=False) as npz:
            inputs = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {src} as .npz: {exc}") from None
    try:
        _, outputs = host.predict(name, inputs)
    except (InputError, InferenceError, UnknownModelError) as exc:
        raise CliError(str(exc)) from None
    with open(dest, "wb") as fh:
        np.savez(fh, **outputs)  # type: ignore[arg-type]  # numpy's stub reads **arrays as allow_pickle
    print(f"wrote {dest} ({', '.join(sorted(outputs))}) from {name} release {loaded.release}")
    return 0


def cmd_score(config: AgentConfig, name: str, input_dir: Path, output_dir: Path, pattern: str) -> int:
    from agent.batch import score_files

    if not input_dir.is_dir():
        raise CliError(f"input directory {input_dir} does not exist")
    loaded = _load_active(config, name)
    host = ModelHost(BatchPolicy(max_batch_size=1))  # one file at a time: nothing to merge
    host.swap(loaded)
    tty = sys.stderr.isatty()
    last = [0.0]
    failed = [0]

    def progress(i: int, total: int, src: Path, error: str | None) -> None:
        if error is not None:
            failed[0] += 1
            print(("\n" if tty else "") + f"skipped {src}: {error}", file=sys.stderr)
        now = time.monotonic()
        if i == total or (tty and now - last[0] > 0.1) or (not tty and i % max(1, total // 10) == 0):
            last[0] = now
            line = f"scored {i}/{total} files ({i - failed[0]} ok, {failed[0]} failed)"
            print(("\r" + line) if tty else line, end="" if tty and i < total else "\n",
                  file=sys.stderr, flush=True)

    try:
        report = score_files(host, name, input_dir, output_dir, pattern=pattern, progress=progress)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    finally:
        host.close()
    if report.total == 0:
        raise CliError(f"no file in {input_dir} matches {pattern!r}")
    rate = report.scored / report.seconds if report.seconds else 0.0
    print(f"scored {report.scored} of {report.total} files with {name} release {loaded.release} into "
          f"{output_dir} in {report.seconds:.2f} s ({rate:.1f} files/s); {len(report.failed)} failed")
    for src, error in report.failed:
        print(f"  failed {src}: {error}")
    return EXIT_PARTIAL if report.failed else 0


def cmd_status(config: AgentConfig, as_json: bool) -> int:
    from agent.connection_state import status_document, status_lines

    records = StateStore(config.state_dir).load_all()
    links = status_document(config.state_dir)
    if as_json:
        print(msgspec.json.encode({"models": list(records.values()), **links}).decode())
        return 0
    if not records:
        print(f"no models in {config.state_dir}")
    for name, rec in sorted(records.items()):
        active, previous = _release_text(rec.active), _release_text(rec.previous)
        target = f"r{rec.target.release}" if rec.target else "none"
        print(f"{name}: state {rec.state}, active {active}, previous {previous}, last target {target}")
        if rec.reason:
            print(f"  reason {rec.reason}: {rec.message}")
        elif rec.message:
            # e.g. "r12 staged, waiting for the activation window 02:00-05:00 local time (device)"
            print(f"  {rec.message}")
        if rec.committed is not None:
            print(f"  last committed {_release_text(rec.committed)} (kept on disk)")
    for line in status_lines(links):
        print(line)
    return 0


def _release_text(ref: ReleaseRef | None) -> str:
    """``r12 (1.2.0)``: a release number with its version label beside it."""
    if ref is None:
        return "none"
    return f"r{ref.release}" + (f" ({ref.version})" if ref.version else "")


def main(argv: list[str] | None = None, *, gc_enabled: bool | None = None) -> int:
    """The CLI. The cyclic collector is off while the command starts (``run``: until the agent
    serves; the others: until their arguments are parsed), then on again when it was on
    (``gc_enabled``: it was on before the caller turned it off to import this module;
    default: as found)."""
    on = gc.isenabled() if gc_enabled is None else gc_enabled
    gc.disable()
    try:
        return _main(argv, on)
    finally:
        if on:
            gc.enable()


def _main(argv: list[str] | None, gc_enabled: bool) -> int:
    fast = run_args(sys.argv[1:] if argv is None else argv)
    args = fast if fast is not None else build_parser().parse_args(argv)
    if args.command != "run" and gc_enabled:
        gc.enable()  # a long score or install collects as usual
    if args.command == "doctor":
        from agent.doctor import doctor

        path = args.config or default_config_path()
        return doctor(lambda: load_config(path), path, print)
    try:
        config = _config(args.config)
        if args.command == "run":
            return cmd_run(config, args.log_level, args.log_format, args.config or default_config_path(),
                           gc_enabled=gc_enabled)
        if args.command == "install":
            return cmd_install(config, args.bundle)
        if args.command == "predict":
            return cmd_predict(config, args.name, args.input, args.output)
        if args.command == "score":
            return cmd_score(config, args.name, args.input_dir, args.output_dir, args.pattern)
        if args.command == "trust":
            return cmd_trust(config, args)
        if args.command == "status":
            return cmd_status(config, args.json)
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    except (ConfigError, StateError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except EdgefleetError as exc:
        print(f"{PROG}: error: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    build_parser().error(f"unknown command {args.command}")  # exits (2)
