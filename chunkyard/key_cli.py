"""`chunkyard key`: the repository key — fingerprint, paper export and import, passphrase change.

All work on the data directory (no server needed; a running server keeps using the key it unlocked)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path

NEW_PASSPHRASE_ENV = "CHUNKYARD_NEW_PASSPHRASE"


def _descriptor(data: Path):  # returns the engine Descriptor (imported lazily)
    from repo_server.engine import read_descriptor

    desc = read_descriptor(data)
    if desc.encryption == "none":
        raise ValueError(f"{data} is not encrypted: it has no key")
    return desc


def _new_passphrase() -> str:
    if os.environ.get(NEW_PASSPHRASE_ENV):
        return os.environ[NEW_PASSPHRASE_ENV]
    if not sys.stdin.isatty():
        raise ValueError(f"set {NEW_PASSPHRASE_ENV} (no terminal to ask on)")
    first = getpass.getpass("New passphrase: ")
    if first != getpass.getpass("Again: ") or len(first) < 8:
        raise ValueError("the passphrases differ or are shorter than 8 characters; nothing was changed")
    return first


def cmd_fingerprint(args: argparse.Namespace, passphrase_for: Callable[[Path], str | None]) -> None:
    print(_descriptor(Path(args.data)).key_fingerprint)


def cmd_export(args: argparse.Namespace, passphrase_for: Callable[[Path], str | None]) -> None:
    from repo_server.engine.keyring import fingerprint, load_key, paper_key

    data = Path(args.data)
    desc = _descriptor(data)
    master = load_key(data, passphrase_for(data))
    print(f"Chunkyard repository {desc.repository_id}, key fingerprint {fingerprint(master)}.\n"
          "Anyone holding this key can read every backup: print it, store it off site, then clear the screen.\n")
    print(paper_key(master))


def cmd_import(args: argparse.Namespace, passphrase_for: Callable[[Path], str | None]) -> None:
    """Install a paper key into a data directory (a fresh machine attaching a bucket, a lost repo.key)."""
    from repo_server.engine.keyring import fingerprint, from_paper, save_key

    data = Path(args.data)
    desc = _descriptor(data)
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    master = from_paper(text)
    if fingerprint(master) != desc.key_fingerprint:
        raise ValueError(f"this paper key (fingerprint {fingerprint(master)}) belongs to another repository "
                         f"(this one's is {desc.key_fingerprint}); nothing was changed")
    where = save_key(data, master, os.environ.get("CHUNKYARD_PASSPHRASE") or None)
    print(f"Key {desc.key_fingerprint} installed in {where}.")


def cmd_change_passphrase(args: argparse.Namespace, passphrase_for: Callable[[Path], str | None]) -> None:
    from repo_server.engine.keyring import load_key, save_key

    data = Path(args.data)
    _descriptor(data)
    master = load_key(data, passphrase_for(data))  # proves the old passphrase (or key file) first
    where = save_key(data, master, _new_passphrase())
    print(f"The key is now wrapped by the new passphrase in {where} (repo.key, if any, was removed).")


def add_key_parser(sub: argparse._SubParsersAction, passphrase_for: Callable[[Path], str | None]) -> None:
    p = sub.add_parser("key", help="the repository key: fingerprint, paper export/import, passphrase change")
    ksub = p.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    actions = (
        ("show-fingerprint", cmd_fingerprint, "print the key's public fingerprint"),
        ("export", cmd_export, "print the key as a paper key (checksummed text) to keep off site"),
        ("import", cmd_import, "install a paper key into a data directory (e.g. after attaching a bucket)"),
        ("change-passphrase", cmd_change_passphrase,
         f"wrap the key with a new passphrase (${NEW_PASSPHRASE_ENV} or a prompt); removes repo.key"),
    )
    for name, func, text in actions:
        kp = ksub.add_parser(name, help=text)
        kp.add_argument("--data", default="./data", help="repository directory (default ./data)")
        if name == "export":
            kp.add_argument("--paper", action="store_true", required=True, help="the printable form (required)")
        if name == "import":
            kp.add_argument("file", help="a file holding the paper key, or - for standard input")
        kp.set_defaults(func=lambda args, f=func: f(args, passphrase_for))
