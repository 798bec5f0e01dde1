"""Fetch a model directory for a Baton pod; run by the `fetch-model` init container.

    python3 fetch_model.py --uri URI --dest DIR [--tokenizer-only]

URI is `hf://ORG/NAME[@REVISION]` (Hugging Face Hub, through `huggingface_hub`, which both
images carry as a dependency of `tokenizers`; `HF_TOKEN` or `BATON_MODEL_TOKEN` for gated
models) or an `http(s)://` URL of a .tar, .tar.gz or .tgz archive (`BATON_MODEL_TOKEN`, if
set, is sent as a bearer token). `--tokenizer-only` keeps just what the router reads:
config, tokenizer files and the chat template.

The operator ships this file in a ConfigMap, so it must run on the standard library alone
(plus huggingface_hub for hf://). It is idempotent: a marker file records a finished
fetch of the same URI, so a restarted pod reuses its emptyDir.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

MARKER = ".baton-fetched"
TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                   "vocab*", "merges.txt", "*.jinja", "chat_template*")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class FetchError(Exception):
    """The URI cannot be fetched; the message says why and what to change."""


def parse_hf(uri: str) -> tuple[str, str | None]:
    """`hf://org/name@rev` -> ("org/name", "rev"); the revision is optional."""
    path = uri.removeprefix("hf://")
    repo, _, revision = path.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise FetchError(f"{uri!r}: expected hf://ORG/NAME[@REVISION]")
    return repo, revision or None


def wanted(name: str, tokenizer_only: bool) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not tokenizer_only or any(fnmatch.fnmatch(base, pat) for pat in TOKENIZER_FILES)


def fetch_hf(uri: str, dest: Path, tokenizer_only: bool) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise FetchError("hf:// sources need the huggingface_hub package in the image") from error
    repo, revision = parse_hf(uri)
    token = os.environ.get("HF_TOKEN") or os.environ.get("BATON_MODEL_TOKEN") or None
    snapshot_download(repo_id=repo, revision=revision, local_dir=str(dest), token=token,
                      allow_patterns=list(TOKENIZER_FILES) if tokenizer_only else None)


def fetch_archive(uri: str, dest: Path, tokenizer_only: bool) -> None:
    if not uri.split("?", 1)[0].endswith(ARCHIVE_SUFFIXES):
        raise FetchError(f"{uri!r}: http(s) sources must be a {'/'.join(ARCHIVE_SUFFIXES)} "
                         "archive of the model directory")
    request = urllib.request.Request(uri)
    token = os.environ.get("BATON_MODEL_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=60) as response:
        # Stream mode: the archive is never held in memory or on disk whole.
        with tarfile.open(fileobj=response, mode="r|*") as archive:
            for member in archive:
                if member.isfile() and wanted(member.name, tokenizer_only):
                    archive.extract(member, dest, filter="data")
    _flatten(dest)


def _flatten(dest: Path) -> None:
    """An archive of `model/...` lands in dest/model: move its content up to dest."""
    entries = [entry for entry in dest.iterdir() if entry.name != MARKER]
    if len(entries) == 1 and entries[0].is_dir() and not (dest / "config.json").exists():
        inner = entries[0]
        for child in inner.iterdir():
            shutil.move(str(child), dest / child.name)
        inner.rmdir()


def fetch(uri: str, dest: Path, tokenizer_only: bool = False) -> bool:
    """Fill `dest` from `uri`. Returns False when a previous run already did."""
    marker = dest / MARKER
    stamp = f"{uri} tokenizer-only={tokenizer_only}\n"
    if marker.exists() and marker.read_text() == stamp:
        return False
    dest.mkdir(parents=True, exist_ok=True)
    if uri.startswith("hf://"):
        fetch_hf(uri, dest, tokenizer_only)
    elif uri.startswith(("http://", "https://")):
        fetch_archive(uri, dest, tokenizer_only)
    else:
        raise FetchError(f"{uri!r}: supported sources are hf://ORG/NAME[@REVISION] and "
                         "http(s):// archives; mount other storage with model.source.pvc")
    if not (dest / "config.json").exists():
        raise FetchError(f"{uri!r} holds no config.json at its top level: not a model directory")
    marker.write_text(stamp)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch a model directory for a Baton pod.")
    parser.add_argument("--uri", required=True)
    parser.add_argument("--dest", required=True, type=Path)
    parser.add_argument("--tokenizer-only", action="store_true")
    args = parser.parse_args(argv)
    try:
        done = fetch(args.uri, args.dest, args.tokenizer_only)
    except (FetchError, OSError, tarfile.TarError) as error:
        print(f"fetch-model: {error}", file=sys.stderr)
        return 1
    print(f"fetch-model: {args.uri} -> {args.dest} ({'fetched' if done else 'already there'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
