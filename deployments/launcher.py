"""`wan-t2v serve` and `wan-t2v convert`: the operator's launcher.

`serve` writes the seed's flags into the YAML as operator pins (the seed's "command line beats the
UI") and hands the result to `serve run`, so it deploys what `serve run` deploys. Torch and Ray are
imported here only when a command runs: the client commands (`deployments.cli`) start in a second.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from pydantic import ValidationError

from deployments.client import CliError
from pipeline.params import ALLOWED

BUILDER = "deployments.app:build"
SEED_PIN_FLAGS = ("offload_model", "t5_cpu", "sample_shift", "sample_guide_scale")
SERVE_RUN = [sys.executable, "-m", "ray.serve.scripts", "run"]  # the `serve` of this interpreter's Ray
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def serve_command(args: argparse.Namespace) -> int:
    config = serve_config(args)
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    if args.dry_run:
        print(text, end="")
        return 0
    return run_serve(text)


def serve_config(args: argparse.Namespace) -> dict:
    """The --config YAML with the flags applied, checked the way `deployments.app.build` will check it."""
    try:
        config = yaml.safe_load(args.config.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise CliError(f"--config: {error}") from None
    applications = config.get("applications") if isinstance(config, dict) else None
    if not applications:
        raise CliError(f"{args.config}: no applications to serve")
    app = applications[0]
    if app.get("import_path") != BUILDER:
        raise CliError(f"{args.config}: the first application imports {app.get('import_path')!r}; wan-t2v serve configures {BUILDER}")
    app_args = app["args"] = app.get("args") or {}

    if args.ckpt_dir is not None:
        app_args["model"] = str(checkpoint_folder(args.ckpt_dir))
    pins = {name: getattr(args, name) for name in SEED_PIN_FLAGS if getattr(args, name) is not None}
    if pins:
        app_args["pins"] = {**(app_args.get("pins") or {}), **pins}
    if args.num_replicas is not None:
        generator = app_args["generator"] = app_args.get("generator") or {}
        if generator.get("autoscaling_config"):
            raise CliError(f"--num_replicas: {args.config} scales the generator with autoscaling_config; edit that instead")
        generator["num_replicas"] = args.num_replicas
    if args.port is not None:
        config["http_options"] = {**(config.get("http_options") or {}), "port": args.port}

    validated = validate_app_args(app_args, args.config)
    if app_args.get("pins"):
        app_args["pins"] = validated.pins.given()  # real booleans and numbers in the YAML, not the flags' text
    return config


def checkpoint_folder(ckpt_dir: Path) -> Path:
    """Absolute, so it means the same folder to every Ray worker; checked now rather than after Ray starts."""
    from pipeline.loading import ModelNotFound, detect_layout

    folder = ckpt_dir.expanduser().resolve()
    try:
        detect_layout(folder)
    except ModelNotFound as error:
        raise CliError(f"--ckpt_dir: {error}") from None
    return folder


def validate_app_args(app_args: dict, config_path: Path):
    from deployments.app import AppArgs  # brings torch and Ray: only `serve` pays for them

    try:
        return AppArgs.model_validate(app_args)
    except ValidationError as error:
        raise CliError("\n".join(f"{config_path}: {describe_arg_error(item)}" for item in error.errors(include_url=False))) from None


def describe_arg_error(item: dict) -> str:
    """`args.<key>: <problem>`, with what is allowed where the key is a generation parameter."""
    key = ".".join(["args", *map(str, item["loc"])])
    if item["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    got = f" (got {item['input']!r})" if item["loc"] else ""  # a whole-args error would repeat every arg
    text = f"{key}: {item['msg'].removeprefix('Value error, ')}{got}"
    allowed = ALLOWED.get(str(item["loc"][-1])) if item["loc"][:1] in (("pins",), ("defaults",)) else None
    return f"{text}; allowed: {allowed}" if allowed else text


def run_serve(config_text: str) -> int:
    """`serve run` on the YAML in a file that lives as long as it runs.

    The child runs in its own session, so a Ctrl-C at the terminal reaches only this process,
    which passes it on exactly once (twice would cut short Serve's clean shutdown).
    """
    with tempfile.NamedTemporaryFile("w", prefix="wan-t2v-serve-", suffix=".yaml") as file:
        file.write(config_text)
        file.flush()
        child = subprocess.Popen([*SERVE_RUN, file.name], start_new_session=True)
        previous = {signum: signal.signal(signum, lambda received, _frame: child.send_signal(received)) for signum in FORWARDED_SIGNALS}
        try:
            code = child.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return code if code >= 0 else 128 - code


def convert_command(args: argparse.Namespace) -> int:
    from pipeline import convert  # torch and diffusers: imported only for this command

    return convert.main(args.convert_args)
