"""The `baton` command: one entry point, one subcommand per component.

Subcommands are imported lazily so that `baton serve-router` or `baton operator` never
import torch, and `--help` is instant.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help). Each function takes argv (list[str]) and
# returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("baton.up:main", "run router and workers locally on one machine"),
    "serve": ("baton.serve:main", "serve a model as `vllm serve` does, with vLLM's flags (one process; -dp/--disaggregated: router + workers)"),
    "generate": ("baton.engine.offline:main", "offline generation with the engine"),
    "tiny-model": ("baton.engine.tiny_model:main", "write the embedded tiny random model"),
    "serve-prefill": ("baton.prefill.server:main", "run a prefill worker"),
    "serve-decode": ("baton.decode.server:main", "run a decode worker"),
    "serve-colocated": ("baton.colocated.server:main", "run a colocated worker (prefill and decode in one)"),
    "serve-cell": ("baton.cell:main", "run a cell: prefill and decode engines of one pod, KV by ipc"),
    "serve-router": ("baton.router.server:main", "run the OpenAI-compatible router"),
    "operator": ("baton.operator.main:main", "run the Kubernetes operator"),
}

# Old spellings still accepted where users and manifests already type them.
ALIASES = {"serve-worker": "serve-colocated"}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: baton <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += [f"  {old:<{width}}  alias of {new}" for old, new in ALIASES.items()]
    lines += ["", "Run `baton <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from baton import __version__

        print(f"baton {__version__}")
        return 0
    name, rest = ALIASES.get(argv[0], argv[0]), argv[1:]
    if name not in COMMANDS:
        print(f"baton: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
