"""The ``sciscope`` command line.

``sciscope run DOMAIN [--set key=value ...] [--profile quick|full] [--cores N] [--out DIR]``
                                run a domain's pipeline (Snakemake), resuming where it stopped
``sciscope domains``            list registered domain adapters, one line each
``sciscope new-domain NAME``    write a working adapter skeleton and its test
``sciscope report RUN_DIR``     (re)build a run's HTML report
``sciscope sites MODEL_DIR``    list the sites (module paths) of a local Hugging Face model
``sciscope demo [--out DIR]``   run the core walkthrough on a small locally trained model

Errors that sciscope raises on purpose print one line and exit with status 1; usage errors (bad
arguments, unknown config keys or ill-typed values) exit 2.
"""

from __future__ import annotations

import argparse
import sys

from sciscope.core.errors import ConfigError, SciscopeError
from sciscope.pipelines.layout import STAGES


def _cmd_domains(args: argparse.Namespace) -> int:
    from sciscope.core import available_domains

    from sciscope.pipelines.skeleton import LOCAL_REGISTRY, local_domains

    domains = available_domains()
    local = local_domains()
    if not domains and not local:
        print("no domain adapters registered (entry-point group 'sciscope.domains')")
    for name, cls in sorted(domains.items()):
        print(f"{name:<14} {cls.description}")
    for name, target in sorted(local.items()):
        if name not in domains:
            print(f"{name:<14} (local, {LOCAL_REGISTRY}) {target}")
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


def _cmd_run(args: argparse.Namespace) -> int:
    import json
    import os
    import subprocess
    import time
    from pathlib import Path

    from sciscope.core.io import write_json
    from sciscope.pipelines.config import load_adapter_class, parse_sets, resolve_adapter_spec, resolve_config
    from sciscope.pipelines.layout import RUN_FILE, read_run_info

    cls = load_adapter_class(args.domain)
    config = resolve_config(cls, profile=args.profile, overrides=parse_sets(args.set or []))
    adapter_spec = resolve_adapter_spec(args.domain)
    run_dir = Path(args.out) / cls.name / (args.run or args.profile)
    run_dir.mkdir(parents=True, exist_ok=True)
    old = read_run_info(run_dir)
    if old.get("adapter") != adapter_spec or old.get("config") != json.loads(json.dumps(config, default=str)):
        write_json(run_dir / RUN_FILE, {"domain": cls.name, "adapter": adapter_spec, "run": run_dir.name,
                                        "config": config, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    snakefile = Path(__file__).with_name("Snakefile")
    # a Snakemake target first (before the options that take several values): stop after a stage
    target = [f"{args.until}/done.json"] if args.until else []
    cmd = [sys.executable, "-m", "snakemake", *target, "--snakefile", str(snakefile), "--directory", str(run_dir.resolve()),
           "--cores", str(args.cores), "--rerun-incomplete", "--nolock", "--config", f"run_dir={run_dir.resolve()}",
           f"progress={not args.quiet}", f"cores={args.cores}", "--quiet", "rules"]
    if args.dry_run:
        cmd.append("--dry-run")
    cmd += args.snakemake_arg or []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"sciscope: {cls.name} run -> {run_dir}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        logs = sorted((run_dir / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime)
        where = f"; see {logs[-1]}" if logs else ""
        print(f"sciscope: error: the {cls.name} pipeline failed{where}", file=sys.stderr)
        return 1
    if args.until and args.until != "report":
        print(f"sciscope: stages up to {args.until} done in {time.time() - t0:.1f} s -> {run_dir}", flush=True)
        return 0
    report = run_dir / "report" / "report.html"
    print(f"sciscope: done in {time.time() - t0:.1f} s; report: {report}", flush=True)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from sciscope.pipelines.report import build_report

    print(build_report(args.run_dir))
    return 0


def _cmd_new_domain(args: argparse.Namespace) -> int:
    from sciscope.pipelines.skeleton import write_skeleton

    for path in write_skeleton(args.name, args.dir):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sciscope", description="Open up scientific foundation models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a domain's pipeline (resumes; reruns only what changed)")
    p.add_argument("domain", help="registered domain name, module:Class or path/to/adapter.py:Class")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--profile", default="quick", choices=["quick", "full"], help="config profile (default quick)")
    p.add_argument("--cores", type=int, default=2,
                   help="cores for the run (default 2): a stage that runs alone uses all, stages that may overlap share them")
    p.add_argument("--out", default="runs", help="runs folder (default runs/); the run goes to OUT/DOMAIN/RUN")
    p.add_argument("--run", default=None, help="run name (default: the profile)")
    p.add_argument("--dry-run", action="store_true", help="show what would run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--until", choices=list(STAGES), metavar="STAGE",
                   help=f"stop after this stage and the ones it needs ({', '.join(STAGES)})")
    p.add_argument("--snakemake-arg", action="append", metavar="ARG",
                   help="pass an argument to Snakemake, e.g. --snakemake-arg=--executor=slurm (repeatable)")
    p.set_defaults(fn=_cmd_run)
    p = sub.add_parser("report", help="(re)build a run's HTML report")
    p.add_argument("run_dir")
    p.set_defaults(fn=_cmd_report)
    p = sub.add_parser("new-domain", help="write a working adapter skeleton and its test")
    p.add_argument("name", help="domain name (a Python identifier)")
    p.add_argument("--dir", default=".", help="where to write the package (default .)")
    p.set_defaults(fn=_cmd_new_domain)
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
    except ConfigError as e:  # a bad --set key or value is a usage error
        print(f"sciscope: error: {e}", file=sys.stderr)
        return 2
    except SciscopeError as e:
        print(f"sciscope: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
