"""The ``sciscope`` command line.

``sciscope run DOMAIN [--set key=value ...] [--profile quick|full] [--cores N] [--out DIR]``
                                run a domain's pipeline (Snakemake), resuming where it stopped
``sciscope domains``            list registered domain adapters, one line each
``sciscope new-domain NAME``    write a working adapter skeleton and its test
``sciscope report RUN_DIR``     (re)build a run's HTML report
``sciscope sites MODEL_DIR``    list the sites (module paths) of a local Hugging Face model
``sciscope demo [--out DIR]``   run the core walkthrough on a small locally trained model

Errors that sciscope raises on purpose print one line and exit with status 1; usage errors (bad
arguments, an unknown domain, unknown config keys, ill-typed, out-of-range or non-finite values, a
model directory that cannot be read) exit 2 before anything is written. ``run`` holds the run
folder's lock (:mod:`sciscope.pipelines.lock`) while it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    from transformers import AutoModel

    from sciscope.core import list_sites
    from sciscope.core.loading import checkpoint_config

    # Build the architecture from its config only: listing sites needs no weights and runs no remote code.
    model = AutoModel.from_config(checkpoint_config(args.model, key="MODEL_DIR"))
    for site in list_sites(model, leaves_only=args.leaves):
        print(site)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sciscope.pipelines.demo import main as demo_main

    return demo_main(["--out", args.out] + (["--quiet"] if args.quiet else []))


def run_folder(out: str, domain: str, run: str) -> Path:
    """``OUT/DOMAIN/RUN``, checked before anything is written: ``run`` is one plain path component
    (no separators, not ``.``/``..``, not hidden); no part of the path is a file, and an existing
    folder there is a run folder (``run.json``) or empty: sciscope never writes into what is not its own."""
    if not run or run in (".", "..") or run.startswith(".") or "/" in run or "\\" in run or Path(run).is_absolute():
        raise ConfigError(f"--run {run!r}: a run name is one folder name (letters, digits, '-', '_', '.'; "
                          "no '/', not starting with '.'); use --out to choose where runs go")
    run_dir = Path(out) / domain / run
    for parent in (run_dir, *run_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--out {out!r}: {parent} is a file, not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / "run.json").is_file():
        raise ConfigError(f"{run_dir} exists and is not a sciscope run folder (no run.json); "
                          "choose another --run or --out")
    return run_dir


def validation_key(args: argparse.Namespace) -> str | None:
    """A hash of what decides a run's validated config: the domain, profile and ``--set`` values,
    and the size and modification time of every source file of sciscope (and of the adapter's
    file for ``path.py:Class``). None where the adapter's code cannot be fingerprinted without
    importing it (a third-party module), which then is always imported and validated."""
    import hashlib
    import importlib.metadata
    import importlib.util
    import json
    import os

    from sciscope.core.config import ENTRY_POINT_GROUP
    from sciscope.pipelines.skeleton import LOCAL_REGISTRY, local_domains

    files: list[Path] = []
    for package in ("sciscope.core", "sciscope.domains", "sciscope.pipelines", "sciscope.data"):
        spec = importlib.util.find_spec(package)
        for root in (Path(p) for p in (spec.submodule_search_locations or [])) if spec else ():
            # the data folder's own tables only, not the caches that runs write beneath it
            found = root.glob("*") if package == "sciscope.data" else root.rglob("*")
            files += sorted(f for f in found if f.suffix in (".py", ".smk", ".csv") or f.name == "Snakefile")
    # the adapter's own code: sciscope's domains are among the files above; a local or file adapter adds its file
    spec = local_domains().get(args.domain, args.domain)
    own = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if ":" in spec:
        target = spec.rpartition(":")[0]
        if not target.endswith(".py"):
            return None  # module:Class, possibly of another package
        folder = Path(target).resolve().parent  # the adapter file and the modules beside it that it may import
        files += [Path(target).resolve(), *sorted(folder.rglob("*.py"))]
    elif not own.get(spec, "").startswith("sciscope."):
        return None  # another package's entry point (or an unknown name, which the full check reports)
    files.append(Path(LOCAL_REGISTRY).resolve())  # local domains registered in this folder
    stats = [(str(f), f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else (str(f), None, None) for f in files]
    what = {"domain": args.domain, "profile": args.profile, "set": list(args.set or []), "python": sys.executable,
            "cwd": os.getcwd(), "files": stats}
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def _failure_line(run_dir: Path) -> str:
    """The failed stage's one-line summary and its log (stages log ``stage X failed: ...`` last)."""
    logs = sorted((run_dir / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime)
    for log in reversed(logs):  # stages may run side by side: the newest log that says it failed
        failed = [line for line in log.read_text(errors="replace").splitlines() if " failed: " in line]
        if failed:
            return f": {failed[-1].split(' failed: ', 1)[1]} (log: {log})"
    return f"; see {logs[-1]}" if logs else ""


def lost_stages(run_dir: Path, target: str = "report", *, steering_uses_features: bool = False) -> list[str]:
    """Stages needed for ``target`` whose ``done.json`` is gone while a later stage's is still there.

    Snakemake treats such a marker like an intermediate file whose consumers are up to date and
    would not rerun the stage; deleting a stage's ``done.json`` is how a user asks for it (and
    what depends on it) to run again, so these stages are forced.
    """
    from sciscope.pipelines.layout import DONE_FILE, upstream

    needed = upstream(target, steering_uses_features=steering_uses_features)
    done = [i for i, s in enumerate(STAGES) if (run_dir / s / DONE_FILE).is_file()]
    return [s for i, s in enumerate(STAGES) if s in needed and i not in done and done and max(done) > i]


def _cmd_run(args: argparse.Namespace) -> int:
    import json
    import os
    import subprocess
    import tempfile
    import time

    from sciscope.core.io import write_json
    from sciscope.pipelines.layout import RUN_FILE, read_run_info
    from sciscope.pipelines.lock import describe_holder, run_lock

    if args.cores < 1:
        raise ConfigError(f"--cores must be >= 1, got {args.cores}")
    # A rerun of the same command on the same code reuses the config that command validated last
    # time (run.json), without importing the adapter (torch, its domain libraries): a run with
    # nothing left to do stays a matter of seconds.
    key = validation_key(args)
    old = read_run_info(Path(args.out) / args.domain / (args.run or args.profile)) if key and ":" not in args.domain else {}
    if key and old.get("validated") == key:
        info = {k: old[k] for k in ("domain", "adapter", "run", "config", "created", "stage_of_key", "steering_uses_features",
                                    "validated")}
        run_dir = run_folder(args.out, info["domain"], args.run or args.profile)
    else:
        from sciscope.pipelines.config import load_adapter_class, parse_sets, resolve_adapter_spec, resolve_config, stage_of_key

        # everything is checked before the run folder is touched: a bad input writes nothing
        cls = load_adapter_class(args.domain)
        config = resolve_config(cls, profile=args.profile, overrides=parse_sets(args.set or []))
        adapter_spec = resolve_adapter_spec(args.domain)
        run_dir = run_folder(args.out, cls.name, args.run or args.profile)
        info = {"domain": cls.name, "adapter": adapter_spec, "run": run_dir.name, "config": config,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                # for the Snakefile, which then plans the run without importing the adapter
                "stage_of_key": {k: stage_of_key(cls, k) for k in config},
                "steering_uses_features": bool(cls.steering_uses_features),
                "validated": key}
    name = info["domain"]
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir, command=f"sciscope run {args.domain}") as stale, tempfile.TemporaryDirectory() as tmp:
        if stale:
            print(f"sciscope: note: the previous run here ({describe_holder(stale)}) was stopped before it ended; "
                  "resuming", flush=True)
        old = read_run_info(run_dir)
        if args.dry_run:  # a dry run shows what the new config would rerun and leaves run.json as it was
            run_file = Path(tmp) / RUN_FILE
            write_json(run_file, info)
        else:
            run_file = run_dir / RUN_FILE
            if any(old.get(k) != json.loads(json.dumps(info.get(k), default=str))
                   for k in ("adapter", "config", "stage_of_key", "steering_uses_features", "validated")):
                # keep what the report stage folded in (model identity, data, stage times): a stage
                # that reruns folds its own afresh
                write_json(run_file, {**old, **info})
        snakefile = Path(__file__).with_name("Snakefile")
        # a Snakemake target first (before the options that take several values): stop after a stage
        target = [f"{args.until}/done.json"] if args.until else []
        # --nolock: the run lock above is ours (Snakemake's own would need --unlock after a kill).
        # --rerun-triggers without "code": a rule's command names the interpreter (python or python3
        # of the same venv) and the progress flag, which change no result; params carry the config.
        cmd = [sys.executable, "-m", "snakemake", *target, "--snakefile", str(snakefile),
               "--directory", str(run_dir.resolve()), "--cores", str(args.cores), "--rerun-incomplete", "--nolock",
               "--rerun-triggers", "mtime", "params", "input", "software-env",
               "--config", f"run_dir={run_dir.resolve()}", f"run_file={run_file.resolve()}",
               f"progress={not args.quiet}", f"cores={args.cores}", "--quiet", "rules"]
        if lost := lost_stages(run_dir, args.until or "report", steering_uses_features=info["steering_uses_features"]):
            cmd += ["--forcerun", *lost]
        if args.dry_run:
            cmd.append("--dry-run")
        cmd += args.snakemake_arg or []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        print(f"sciscope: {name} run -> {run_dir}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        print(f"sciscope: error: the {name} pipeline failed{_failure_line(run_dir)}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"sciscope: dry run: nothing ran; {run_dir} is unchanged", flush=True)
        return 0
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
