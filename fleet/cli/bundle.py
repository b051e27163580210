"""``edgefleet bundle build|inspect|verify``: bundle files on this machine, no fleet needed."""

from __future__ import annotations

import argparse
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet.cli.output import CliError, human_size, print_json
from shared.errors import EdgefleetError

if TYPE_CHECKING:
    import numpy as np

    from shared.bundle.manifest import Manifest
    from shared.bundle.speculative import Speculation
    from shared.bundle.trust import TrustRoot


def _existing_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CliError(f"{what} {p} does not exist")
    if not p.is_file():
        raise CliError(f"{what} {p} is not a file")
    return p


def _load_npz(path: str, what: str) -> dict[str, np.ndarray]:
    import zipfile

    import numpy as np

    p = _existing_file(path, what)
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CliError(f"{what} {p} is not a readable .npz of arrays: {exc}") from None
    if not arrays:
        raise CliError(f"{what} {p} holds no arrays; key them by input name")
    return arrays


def _load_trust(path: str) -> TrustRoot:
    from shared.bundle.trust import TrustRoot

    p = _existing_file(path, "trust root")
    try:
        return TrustRoot.load(p.read_bytes())
    except EdgefleetError as exc:
        raise type(exc)(f"trust root {p} is not usable ({exc.code}): {exc}") from None


# -- build ----------------------------------------------------------------------------


def _fleet_highest(args: argparse.Namespace) -> tuple[int, str]:
    """(highest release of the model in the fleet's registry, where it comes from); (0, "")
    without a fleet. A fleet that was asked for but cannot answer stops the build: numbering
    without it could pick a number the fleet already holds."""
    import os

    url = None if args.offline else (args.fleet or os.environ.get("EDGEFLEET_URL"))
    if not url:
        return 0, ""
    from fleet.cli.client import FleetClient, FleetError, default_token

    try:
        with FleetClient(url, args.token or default_token(), timeout=15.0) as client:
            top = client.highest_release(args.name)
    except FleetError as exc:
        raise CliError(f"cannot number the build above the fleet's releases: {exc}; "
                       "pass --offline to number from the release ledger only") from None
    release = top.get("release")
    if isinstance(release, bool) or not isinstance(release, int) or release < 0:
        raise CliError(f"the fleet at {url} answered an unusable highest release {release!r}")
    version = f" ({top['version']})" if top.get("version") else ""
    return release, f"fleet {url}: r{release}{version}"


def _reserve_release(args: argparse.Namespace, keys_dir: Path) -> int:
    from fleet.bundles.ledger import LEDGER_NAME, ReleaseLedger
    from shared.bundle.manifest import NAME_RE

    if not NAME_RE.match(args.name):
        raise CliError(f"model name {args.name!r} must match {NAME_RE.pattern}")
    fleet_highest, fleet_source = _fleet_highest(args)
    ledger = ReleaseLedger(Path(args.ledger) if args.ledger else keys_dir / LEDGER_NAME)
    return ledger.reserve(
        args.name,
        now_ms=time.time_ns() // 1_000_000,
        explicit=args.release,
        fleet_highest=fleet_highest,
        fleet_source=fleet_source,
    )


def build(args: argparse.Namespace) -> int:
    from fleet.bundles.build import build_bundle
    from shared.bundle.keyring import load_keyring

    model = _existing_file(args.model, "model")
    keys_dir = Path(args.keys)
    if not keys_dir.is_dir():
        raise CliError(
            f"key directory {keys_dir} does not exist; create it with 'edgefleet keys init {keys_dir}'"
        )
    keyring = load_keyring(keys_dir)
    if not keyring.signing_keys:
        raise CliError(f"{keys_dir} holds no signing-N.key; bundles are signed with a delegated signing key")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CliError(f"output directory {out.parent} does not exist")
    golden = _load_npz(args.golden, "golden inputs") if args.golden else None
    if golden and all(k.startswith(("in.", "out.")) for k in golden):
        # A bundle's own golden.npz ("in.<input>", "out.<output>"): reuse its inputs.
        golden = {k[3:]: v for k, v in golden.items() if k.startswith("in.")}
    if args.quantize == "static" and not args.calibration:
        raise CliError("--quantize static needs --calibration FILE.npz (representative inputs)")
    from fleet.bundles.quantize import load_samples
    from fleet.bundles.runners import open_model
    from fleet.bundles.specialise import parse_fixed_inputs

    inputs = open_model(model).inputs if (args.calibration or args.validation) else []
    calibration = load_samples(Path(args.calibration), inputs, "calibration") if args.calibration else None
    validation = load_samples(Path(args.validation), inputs, "validation") if args.validation else None
    signing = keyring.delegation_keys(args.delegation)
    release = _reserve_release(args, keys_dir)
    verified = build_bundle(
        model,
        name=args.name,
        version=args.version,
        release=release,
        keyring=keyring,
        out=out,
        golden_inputs=golden,
        quantization=args.quantize,
        calibration=calibration,
        validation=validation,
        signing_keys=signing,
        max_error=args.max_error,
        fixed_inputs=parse_fixed_inputs(args.fix_input) if args.fix_input else None,
        class_scores=args.class_scores,
        min_argmax_agreement=args.min_argmax_agreement,
        detections=args.detections or None,
        min_detections_kept=args.min_detections_kept,
        atol=args.atol,
        rtol=args.rtol,
        expires_days=args.expires_days,
        min_agent_version=args.min_agent_version,
        description=args.description,
    )
    m = verified.manifest
    print(f"built {out}")
    print(f"  name     {m.name}")
    print(f"  release  {m.release} ({m.version})")
    print(f"  digest   {verified.digest}")
    print(f"  size     {human_size(out.stat().st_size)} ({out.stat().st_size} bytes)")
    if m.quantization.mode != "none":
        print(f"  quant    {m.quantization.mode} {m.quantization.weight_dtype or ''}".rstrip())
        figures = m.quantization.agreement
        if "rel_l2_error" in figures:
            print(f"  accuracy worst relative error {figures['rel_l2_error']:.4f} "
                  f"(bound {args.max_error:g}), "
                  f"size {figures.get('size_ratio', 1.0):.0%} of the float model")
        if "detections_kept" in figures:
            print(f"  detections kept {figures['detections_kept']:.1%} (worst output; bound "
                  f"{args.min_detections_kept:g})")
    if m.fixed_inputs:
        print("  fixed    " + ", ".join(f"{k}={v}" for k, v in m.fixed_inputs.items()))
    print(f"  expires  {m.expires}")
    return 0


# -- inspect --------------------------------------------------------------------------


def _manifest_lines(m: Manifest) -> list[str]:
    def tensors(specs: list[Any]) -> str:
        return ", ".join(f"{s.name} {s.dtype}[{', '.join(str(d) for d in s.shape)}]" for s in specs)

    lines = [
        f"  name          {m.name}",
        f"  release       {m.release} ({m.version})"
        + (f", re-issue of {m.reissue_of}" if m.reissue_of else ""),
        f"  runtime       {m.runtime}, quantization {m.quantization.mode}",
        f"  inputs        {tensors(m.inputs)}",
        f"  outputs       {tensors(m.outputs)}",
        f"  golden tol.   atol {m.golden_tolerance.atol:g}, rtol {m.golden_tolerance.rtol:g}",
        f"  min agent     {m.min_agent_version}",
        f"  created       {m.created}",
        f"  expires       {m.expires}",
    ]
    for role, ref in sorted(m.files.items()):
        lines.append(f"  file {role:<9}{ref.sha256}  {human_size(ref.size)}  {ref.media_type}")
    if m.description:
        lines.append(f"  description   {m.description}")
    return lines


def inspect(args: argparse.Namespace) -> int:
    import msgspec

    from shared.bundle import envelope as dsse
    from shared.bundle.archive import read_envelope
    from shared.bundle.manifest import parse_manifest, payload_digest

    path = _existing_file(args.file, "bundle")
    raw = read_envelope(path)
    env = dsse.Envelope.from_json(raw)
    keyids = [s.keyid for s in env.signatures]
    if args.trust:
        trust = _load_trust(args.trust)
        verified = trust.verify_manifest(raw)
        manifest, digest, delegation = verified.manifest, verified.digest, verified.delegation
    else:
        if env.payload_type != dsse.MANIFEST_TYPE:
            raise CliError(f"{path} carries {env.payload_type!r}, not an edgefleet manifest")
        manifest, digest, delegation = parse_manifest(env.payload), payload_digest(env.payload), None
    if args.json:
        print_json({
            "file": str(path),
            "verified": bool(args.trust),
            "delegation": delegation,
            "digest": digest,
            "payload_type": env.payload_type,
            "signatures": keyids,
            "manifest": msgspec.to_builtins(manifest),
        })
        return 0
    print(f"{path}")
    if args.trust:
        print(f"  VERIFIED against {args.trust}: signed by delegation {delegation!r}, in scope, unexpired")
    else:
        print("  UNVERIFIED: signatures not checked; pass --trust ROOT.json to verify")
    print(f"  digest        {digest}")
    print(f"  signatures    {len(keyids)} by key(s) {', '.join(k[:12] + '…' for k in keyids)}")
    for line in _manifest_lines(manifest):
        print(line)
    return 0


# -- verify ---------------------------------------------------------------------------


def verify(args: argparse.Namespace) -> int:
    # msgspec without typing_extensions and the inspect, ast, dis, tokenize it pulls in: ~9 ms
    # of this command's CPU (docs/performance.md); the head-start hasher thread imports nothing
    from shared.leanimport import import_msgspec_without_typing_extensions

    import_msgspec_without_typing_extensions()
    from shared.bundle.archive import BLOB_PREFIX, check_members, read_envelope
    from shared.bundle.parallel_verify import ranges, verify_in_place

    path = _existing_file(args.file, "bundle")
    speculation: Speculation | None = getattr(args, "speculation", None)
    trust = _load_trust(args.trust)
    try:
        raw = read_envelope(path)
        verified = trust.verify_manifest(raw)
        with tarfile.open(path, "r:") as tar:
            members = check_members(tar, verified.manifest)
        offsets = {member.name[len(BLOB_PREFIX):]: member.offset_data for member in members}
        # Digests hashed while the above ran (shared/bundle/speculative.py), only for the
        # ranges the vetted offsets and the signed chunk sizes name; the rest are read now.
        known = speculation.digests(path, ranges(verified.manifest, offsets)) if speculation else None
        total = verify_in_place(path, verified.manifest, offsets, known=known)
    except tarfile.TarError as exc:
        raise CliError(f"bundle {path} does not verify (malformed): the archive is damaged: {exc}") from None
    except EdgefleetError as exc:
        raise type(exc)(f"bundle {path} does not verify ({exc.code}): {exc}") from None
    m = verified.manifest
    print(f"OK {path}: {m.name} release {m.release} ({m.version}), digest {verified.digest}")
    print(f"   signed by delegation {verified.delegation!r}; {len(members)} file(s), "
          f"{human_size(total)} hash-checked; expires {m.expires}")
    return 0
