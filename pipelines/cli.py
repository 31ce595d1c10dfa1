"""The ``sciscope`` command line.

``sciscope domains``            list registered domain adapters, one line each
``sciscope sites MODEL_DIR``    list the sites (module paths) of a local Hugging Face model
``sciscope demo [--out DIR]``   run the core walkthrough on a small locally trained model

Errors that sciscope raises on purpose print one line and exit with status 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import sys

from sciscope.core.errors import SciscopeError


def _cmd_domains(args: argparse.Namespace) -> int:
    from sciscope.core import available_domains

    domains = available_domains()
    if not domains:
        print("no domain adapters registered (entry-point group 'sciscope.domains')")
    for name, cls in sorted(domains.items()):
        print(f"{name:<14} {cls.description}")
    return 0


def _cmd_sites(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transformers import AutoConfig, AutoModel

    from sciscope.core import list_sites

    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise SciscopeError(f"{path} is not a Hugging Face model directory (no config.json)")
    # Build the architecture from its config only: listing sites needs no weights and runs no remote code.
    model = AutoModel.from_config(AutoConfig.from_pretrained(path, trust_remote_code=False))
    for site in list_sites(model, leaves_only=args.leaves):
        print(site)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sciscope.pipelines.demo import main as demo_main

    return demo_main(["--out", args.out] + (["--quiet"] if args.quiet else []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sciscope", description="Open up scientific foundation models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("domains", help="list registered domain adapters")
    p.set_defaults(fn=_cmd_domains)
    p = sub.add_parser("sites", help="list the sites of a local Hugging Face model directory")
    p.add_argument("model", help="model directory (config.json)")
    p.add_argument("--leaves", action="store_true", help="only modules without children")
    p.set_defaults(fn=_cmd_sites)
    p = sub.add_parser("demo", help="run the core walkthrough on a small locally trained model")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except SciscopeError as e:
        print(f"sciscope: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
