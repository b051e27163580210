"""``edgefleet keys init``: a key directory and the trust root devices pin."""

from __future__ import annotations

import argparse
from pathlib import Path

from fleet.cli.output import CliError


def init(args: argparse.Namespace) -> int:
    from shared.bundle.keyring import init_keyring

    directory = Path(args.directory)
    threshold = args.threshold if args.threshold is not None else min(2, args.root_keys)
    if threshold > args.root_keys:
        raise CliError(
            f"--threshold {threshold} is more than the {args.root_keys} root keys; "
            "lower it or pass more --root-keys"
        )
    if directory.exists() and not directory.is_dir():
        raise CliError(f"{directory} exists and is not a directory")
    if (directory / "root.json").exists():
        raise CliError(
            f"{directory} already holds a root.json; keys are never replaced in place "
            "(rotate the root instead, or pick another directory)"
        )
    ring = init_keyring(
        directory,
        root_keys=args.root_keys,
        root_threshold=threshold,
        signing_keys=args.signing_keys,
        expires_days=args.expires_days,
    )
    root = ring.trust_root()
    n_root, n_sign = len(ring.root_keys), len(ring.signing_keys)
    root_files = "root-1.key" if n_root == 1 else f"root-1.key .. root-{n_root}.key"
    sign_files = "signing-1.key" if n_sign == 1 else f"signing-1.key .. signing-{n_sign}.key"
    print(f"wrote a key directory to {directory}:")
    print(f"  {'root.json':<34} trust root v{root.version}: pin this file on every device "
          f"(agent.toml: trust_root = \"{ring.root_path.resolve()}\")")
    print(f"  {root_files:<34} {n_root} offline root key(s), {threshold} needed to sign a root: "
          "move them off the fleet server")
    print(f"  {sign_files:<34} {n_sign} online signing key(s) for bundles "
          f"(edgefleet bundle build --keys {directory}; edgefleet serve --keys {directory})")
    print(f"root and delegation expire {root.payload.expires}; private keys are readable by you only (0600)")
    return 0


def rotate(args: argparse.Namespace) -> int:
    from shared.bundle.keyring import rotate_root

    if args.threshold > args.root_keys:
        raise CliError(f"--threshold {args.threshold} is more than the {args.root_keys} new root keys")
    root = rotate_root(Path(args.directory), root_keys=args.root_keys, root_threshold=args.threshold,
                       expires_days=args.expires_days)
    print(f"trust root v{root.version} written to {Path(args.directory) / 'root.json'} "
          f"({args.threshold} of {args.root_keys} new root keys; expires {root.payload.expires})")
    print(f"the chain is in {Path(args.directory) / 'roots'}: devices on an older root walk it link by link;")
    print(f"the old root keys moved to {Path(args.directory) / 'retired'}")
    return 0


def delegate(args: argparse.Namespace) -> int:
    from shared.bundle.keyring import delegate as add_delegation

    if args.threshold > args.keys:
        raise CliError(f"--threshold {args.threshold} is more than the {args.keys} keys")
    root = add_delegation(Path(args.directory), name=args.name, models=args.models, keys=args.keys,
                          threshold=args.threshold, expires_days=args.expires_days)
    d = next(d for d in root.payload.delegations if d.name == args.name)
    print(f"delegation {d.name!r}: {len(d.keyids)} key(s), {d.threshold} needed, models {d.models}, "
          f"expires {d.expires}")
    print(f"trust root v{root.version} written; sign with: edgefleet bundle build --delegation {d.name} ...")
    return 0
