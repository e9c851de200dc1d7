"""`wan-t2v`: a client of the HTTP API, and the entry point of the operator's launcher (`deployments.launcher`).

    wan-t2v serve --ckpt_dir ../Wan2.1-T2V-1.3B --offload_model --t5_cpu --sample_shift 8 --sample_guide_scale 6
    wan-t2v generate "a red fox in snow" --size 832*480 --frame_num 33 -o fox.mp4
    wan-t2v list --status in_progress
    wan-t2v status ID | wan-t2v cancel ID | wan-t2v download ID -o fox.mp4

The client commands send only the flags given, so the server's pins and defaults decide the rest.
Torch and Ray are imported by `serve` and `convert` only: the client starts in a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import get_args

import httpx
from pydantic import ValidationError
from tqdm import tqdm

from deployments.client import DEFAULT_URL, CliError, ServerError, VideosClient
from deployments.launcher import SEED_PIN_FLAGS, convert_command, serve_command
from deployments.protocol import ALLOWED_REQUEST, PARAM_FIELDS, TERMINAL_STATUSES, JobStatus, VideoCreateRequest
from pipeline.flags import add_bool_flag
from pipeline.params import describe_errors, field_type, flag_help

INTERRUPTED = 130  # the shell's exit code for a command stopped by Ctrl-C
PROMPT_COLUMN = 40


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
    """Generation parameters under the seed's names, with GenerationParams' help; values stay text for the
    pydantic model behind each command, and an absent flag stays None so the server's precedence decides."""
    for name in names:
        if field_type(name) is bool:
            add_bool_flag(parser, name, default=None, help=help_prefix + flag_help(name))
        else:
            parser.add_argument(f"--{name}", help=help_prefix + flag_help(name))


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
    generate.add_argument("prompt", help=flag_help("prompt"))
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
