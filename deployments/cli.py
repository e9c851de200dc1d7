"""`wan-t2v`: the operator's launcher (`serve`, `convert`) and a client of the HTTP API.

    wan-t2v serve --ckpt_dir ../Wan2.1-T2V-1.3B --offload_model --t5_cpu --sample_shift 8 --sample_guide_scale 6
    wan-t2v generate "a red fox in snow" --size 832*480 --frame_num 33 -o fox.mp4
    wan-t2v list --status in_progress
    wan-t2v status ID | wan-t2v cancel ID | wan-t2v download ID -o fox.mp4

`serve` writes the seed's flags into the YAML as operator pins (the seed's "command line beats the
UI") and hands the result to `serve run`, so it deploys what `serve run` deploys. The client
commands send only the flags given, so the server's pins and defaults decide the rest. Torch and
Ray are imported by `serve` and `convert` only: the client starts in a second.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import get_args

import httpx
import yaml
from pydantic import ValidationError
from tqdm import tqdm

from deployments.client import DEFAULT_URL, ServerError, VideosClient
from deployments.protocol import ALLOWED_REQUEST, PARAM_FIELDS, TERMINAL_STATUSES, JobStatus, VideoCreateRequest
from pipeline.flags import add_bool_flag
from pipeline.params import ALLOWED, describe_errors

BUILDER = "deployments.app:build"
SEED_PIN_FLAGS = ("offload_model", "t5_cpu", "sample_shift", "sample_guide_scale")
BOOL_PARAMS = ("offload_model", "t5_cpu")
SERVE_RUN = [sys.executable, "-m", "ray.serve.scripts", "run"]  # the `serve` of this interpreter's Ray
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INTERRUPTED = 130  # the shell's exit code for a command stopped by Ctrl-C
PROMPT_COLUMN = 40


class CliError(Exception):
    """A failure the user can act on, and the exit code it ends the command with."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# -- serve and convert --------------------------------------------------------------------------


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


# -- the HTTP client ----------------------------------------------------------------------------


def connect(args: argparse.Namespace) -> VideosClient:
    url = getattr(args, "url", None) or os.environ.get("WAN_T2V_URL") or DEFAULT_URL
    return VideosClient(url.rstrip("/"), getattr(args, "api_key", None) or os.environ.get("WAN_T2V_API_KEY"))


def request_body(args: argparse.Namespace) -> dict:
    """Only the flags given, converted by the server's own request model, so a bad type reads as the server would say it."""
    given = {name: getattr(args, name) for name in PARAM_FIELDS if getattr(args, name) is not None}
    try:
        return VideoCreateRequest(**given).model_dump(exclude_none=True)
    except ValidationError as error:
        raise CliError(describe_errors(error, ALLOWED_REQUEST)) from None


def generate_command(args: argparse.Namespace) -> int:
    """Submit, follow, download; a failed or cancelled job ends in exit code 1 with the server's reason."""
    body = request_body(args)
    with connect(args) as api:
        job = api.create(body)
        try:
            announce(job)
            job = follow(api, job)
        except KeyboardInterrupt:
            return interrupted(api, job["id"])
        if job["status"] != "completed":
            reason = (job.get("error") or {}).get("message", "")
            raise CliError(f"job {job['id']} {job['status']}{': ' + reason if reason else ''}", exit_code=1)
        path = api.download(job["id"], args.output or Path(f"{job['id']}.mp4"))
    print(f"saved: {path}")
    return 0


def announce(job: dict) -> None:
    """The job id first (a script can read it from the first line), then what the server decided."""
    print(job["id"], flush=True)
    print(f"seed: {job['seed']}", flush=True)
    for override in job["overridden"]:
        print(f"{override['field']}: {override['effective']} (pinned by the server; you asked for {override['requested']})", flush=True)
    if job["demo_model"]:
        print("note: the server runs the built-in DEMO model (random weights): the video will be noise", file=sys.stderr)


def follow(api: VideosClient, job: dict) -> dict:
    """A progress bar on stderr (phase, step n/N) fed by the job's event stream; reconnects if it drops early."""
    with tqdm(total=job["total_steps"], desc=job["phase"], unit="step", file=sys.stderr, mininterval=0) as bar:
        while job["status"] not in TERMINAL_STATUSES:
            for _event, update in api.events(job["id"]):  # the server closes the stream after `done`
                job = update
                bar.set_description_str(job["phase"], refresh=False)
                bar.n = job["step"]
                bar.refresh()
    return job


def interrupted(api: VideosClient, job_id: str) -> int:
    """Ctrl-C stops this client, and asks whether the job should stop too: nobody else may be waiting for it.

    Enter means no (the [y/N] default). End of input means yes: no one can answer (stdin is
    /dev/null or closed), and the interrupted client was the one waiting for this video. A second
    Ctrl-C leaves the job running.
    """
    print(f"\nCancel job {job_id} on the server? [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        answer = "n"
    if answer and answer.strip().lower() not in ("y", "yes"):
        print(f"job {job_id} keeps running: `wan-t2v status {job_id}`, then `wan-t2v download {job_id}`", file=sys.stderr)
    else:
        cancel_job(api, job_id)
        print(f"cancelled {job_id}", file=sys.stderr)
    return INTERRUPTED


def cancel_job(api: VideosClient, job_id: str) -> dict:
    """The server decides whether the job still runs, so one that has just finished is left as it is (exit 1)."""
    try:
        return api.cancel(job_id)
    except ServerError as error:
        if error.code != "already_finished":
            raise
        raise CliError(error.message, exit_code=1) from None


def cancel_command(args: argparse.Namespace) -> int:
    with connect(args) as api:
        job = cancel_job(api, args.id)
    print(f"{job['id']} {job['status']}")
    return 0


def list_command(args: argparse.Namespace) -> int:
    with connect(args) as api:
        page = api.list(limit=args.limit, status=args.status)
    rows = [("ID", "STATUS", "PROGRESS", "CREATED", "PROMPT")]
    rows += [(job["id"], job["status"], f"{job['progress']}%", created(job), one_line(job["prompt"])) for job in page["data"]]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[-1]]))
    if page["has_more"]:
        print(f"(more jobs than --limit {args.limit})", file=sys.stderr)
    return 0


def created(job: dict) -> str:
    return datetime.fromtimestamp(job["created_at"]).strftime("%Y-%m-%d %H:%M:%S")


def one_line(prompt: str) -> str:
    text = " ".join(prompt.split())
    return text if len(text) <= PROMPT_COLUMN else text[: PROMPT_COLUMN - 1] + "…"


def status_command(args: argparse.Namespace) -> int:
    with connect(args) as api:
        job = api.retrieve(args.id)
    print(json.dumps(job, indent=2, ensure_ascii=False))
    return 0


def download_command(args: argparse.Namespace) -> int:
    variant, suffix = ("thumbnail", ".jpg") if args.thumbnail else ("video", ".mp4")
    with connect(args) as api:
        path = api.download(args.id, args.output or Path(f"{args.id}{suffix}"), variant)
    print(f"saved: {path}")
    return 0


# -- the command line ---------------------------------------------------------------------------


def add_param_flags(parser: argparse.ArgumentParser, names: tuple[str, ...], help_prefix: str = "") -> None:
    """Generation parameters under the seed's names; values stay text for the pydantic model behind each command."""
    for name in names:
        if name in BOOL_PARAMS:
            add_bool_flag(parser, name, default=None, help=help_prefix + ALLOWED[name])
        else:
            parser.add_argument(f"--{name}", help=help_prefix + ALLOWED[name])


def build_parser() -> argparse.ArgumentParser:
    # --url and --api-key work before or after the command; SUPPRESS keeps a later absence from erasing an earlier value.
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", default=argparse.SUPPRESS, help=f"the service (default: $WAN_T2V_URL or {DEFAULT_URL})")
    server.add_argument("--api-key", default=argparse.SUPPRESS, help="sent as a Bearer token (default: $WAN_T2V_API_KEY)")

    parser = argparse.ArgumentParser(prog="wan-t2v", description="Wan2.1 T2V-1.3B text-to-video: run the service, or use it.", parents=[server])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="start the service (serve run) with the seed's flags as operator pins",
        description="Apply the flags to --config and deploy it with `serve run`. Each seed flag pins its parameter "
        "for every request: the command line beats the UI and the API.",
    )
    serve.add_argument("--config", type=Path, default=Path("serve_config.yaml"), help="the Serve YAML (default: serve_config.yaml)")
    serve.add_argument("--ckpt_dir", type=Path, help="a Wan2.1-T2V-1.3B folder, original or diffusers layout (sets args.model)")
    add_param_flags(serve, SEED_PIN_FLAGS, help_prefix="pin for every request: ")
    serve.add_argument("--port", type=int, help="the HTTP port (http_options.port)")
    serve.add_argument("--num_replicas", type=int, help="VideoGenerator replicas, one per GPU (args.generator.num_replicas)")
    serve.add_argument("--dry-run", action="store_true", help="print the YAML that would be deployed (comments dropped) and exit")
    serve.set_defaults(run=serve_command)

    # A prefix no flag uses: every argument, --help included, goes to pipeline.convert's own parser.
    convert = commands.add_parser("convert", add_help=False, prefix_chars="\0", help="ORIGINAL_DIR OUT_DIR: a Wan2.1 release folder as a diffusers folder")
    convert.add_argument("convert_args", nargs="*")
    convert.set_defaults(run=convert_command)

    generate = commands.add_parser(
        "generate",
        parents=[server],
        help="make one video and download it",
        description="Submit a job with the flags given (the server's pins and defaults fill the rest), draw its progress "
        "on stderr and save the MP4. Ctrl-C asks whether to cancel the job on the server: Enter keeps it running, "
        "y cancels, and so does end of input (nobody is left to wait for the video).",
    )
    generate.add_argument("prompt", help=ALLOWED["prompt"])
    add_param_flags(generate, tuple(name for name in PARAM_FIELDS if name != "prompt"))
    generate.add_argument("-o", "--output", type=Path, help="where to save the MP4 (default: <job id>.mp4)")
    generate.set_defaults(run=generate_command)

    listing = commands.add_parser("list", parents=[server], help="recent jobs, newest first")
    listing.add_argument("--limit", type=int, default=20, help="at most this many (1-100, default 20)")
    listing.add_argument("--status", choices=get_args(JobStatus), help="only jobs in this state")
    listing.set_defaults(run=list_command)

    for name, run, text in (("status", status_command, "print a job as JSON"), ("cancel", cancel_command, "cancel a queued or running job")):
        command = commands.add_parser(name, parents=[server], help=text)
        command.add_argument("id", help="the job id (video_...)")
        command.set_defaults(run=run)

    download = commands.add_parser("download", parents=[server], help="save a finished job's MP4 (or thumbnail)")
    download.add_argument("id", help="the job id (video_...)")
    download.add_argument("-o", "--output", type=Path, help="where to save it (default: <job id>.mp4 or .jpg)")
    download.add_argument("--thumbnail", action="store_true", help="the first frame as a JPEG instead of the MP4")
    download.set_defaults(run=download_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as error:
        return fail(str(error).splitlines(), error.exit_code)
    except ServerError as error:
        return fail(error.lines(), 2 if 400 <= error.status < 500 else 1)
    except httpx.TransportError as error:
        return fail([f"no answer from {error.request.url} ({type(error).__name__}: {error}); is the service running? (--url)"], 1)
    except KeyboardInterrupt:
        return INTERRUPTED


def fail(lines: list[str], exit_code: int) -> int:
    for line in lines:
        print(f"wan-t2v: error: {line}", file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
