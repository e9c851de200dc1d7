"""`wan-t2v serve`: the seed's flags land in the YAML as operator pins, and a bad value stops before Ray starts.

No Ray here: `--dry-run` prints what would be deployed, and a stand-in for `serve run` shows that
the real run hands that same YAML over and passes Ctrl-C on once.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from deployments import cli, launcher

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serve_config.yaml"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def dry_run(capsys, *flags: str, config: Path = SERVE_CONFIG) -> dict:
    assert cli.main(["serve", "--dry-run", "--config", str(config), *flags]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def app_args(config: dict) -> dict:
    return config["applications"][0]["args"]


def rejected(capsys, *flags: str, config: Path = SERVE_CONFIG) -> str:
    assert cli.main(["serve", "--dry-run", "--config", str(config), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing that could be mistaken for a deployable YAML
    return captured.err


def test_without_flags_the_yaml_is_deployed_as_written(capsys):
    assert dry_run(capsys) == yaml.safe_load(SERVE_CONFIG.read_text())


def test_default_config_is_serve_config_yaml_in_the_cwd(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["serve", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(SERVE_CONFIG.read_text())


def test_seed_flags_become_operator_pins(capsys):
    config = dry_run(capsys, "--offload_model", "True", "--t5_cpu", "--sample_shift", "10", "--sample_guide_scale", "7.5")
    assert app_args(config)["pins"] == {"offload_model": True, "t5_cpu": True, "sample_shift": 10.0, "sample_guide_scale": 7.5}
    written = yaml.safe_load(SERVE_CONFIG.read_text())
    assert {key: value for key, value in app_args(config).items() if key != "pins"} == app_args(written)


@pytest.mark.parametrize(
    ("flags", "pinned"),
    [(["--t5_cpu"], True), (["--t5_cpu", "false"], False), (["--t5_cpu", "False"], False), (["--offload_model"], True), (["--offload_model", "0"], False)],
)
def test_bool_flags_bare_or_with_a_value(capsys, flags, pinned):
    assert app_args(dry_run(capsys, *flags))["pins"] == {flags[0].removeprefix("--"): pinned}


def test_flags_join_the_pins_already_in_the_yaml(capsys, tmp_path):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    app_args(config)["pins"] = {"sample_steps": 30, "sample_shift": 5}
    path = tmp_path / "pinned.yaml"
    path.write_text(yaml.safe_dump(config))
    assert app_args(dry_run(capsys, "--sample_shift", "9", config=path))["pins"] == {"sample_steps": 30, "sample_shift": 9.0}


def test_ckpt_dir_sets_the_model_to_an_absolute_folder(capsys, tmp_path, monkeypatch):
    checkpoint = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        (checkpoint / part).mkdir(parents=True)
    (checkpoint / "model_index.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    args = app_args(dry_run(capsys, "--ckpt_dir", checkpoint.name))
    assert args["model"] == str(checkpoint)
    assert "pins" not in args


def test_ckpt_dir_that_holds_no_checkpoint_is_refused(capsys, tmp_path):
    assert "--ckpt_dir: " in rejected(capsys, "--ckpt_dir", str(tmp_path))


def test_port_and_replicas_land_where_serve_reads_them(capsys):
    config = dry_run(capsys, "--port", "8123", "--num_replicas", "2")
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert app_args(config)["generator"] == {"num_replicas": 2, "gpus_per_replica": "auto", "memory_policy": "resident"}


def test_tiny_config_gains_replicas_it_did_not_name(capsys):
    assert app_args(dry_run(capsys, "--num_replicas", "3", config=TINY_CONFIG))["generator"]["num_replicas"] == 3


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (["--sample_shift", "-1"], "args.pins.sample_shift: "),
        (["--sample_guide_scale", "25"], "args.pins.sample_guide_scale: "),
        (["--t5_cpu", "maybe"], "args.pins.t5_cpu: "),
        (["--num_replicas", "0"], "args.generator.num_replicas: "),
    ],
)
def test_bad_flag_value_exits_2_naming_the_key(capsys, flags, key):
    assert key in rejected(capsys, *flags)


def test_typo_in_the_config_exits_2_naming_the_key(capsys, tmp_path):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    app_args(config)["generator"]["num_replica"] = 2
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert f"{path}: args.generator.num_replica: unknown key" in rejected(capsys, config=path)


def test_replicas_flag_does_not_silently_lose_to_autoscaling(capsys, tmp_path):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    app_args(config)["generator"]["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 4}
    path = tmp_path / "autoscaling.yaml"
    path.write_text(yaml.safe_dump(config))
    assert "--num_replicas: " in rejected(capsys, "--num_replicas", "2", config=path)


# Stands in for `serve run FILE`: keeps a copy of FILE, counts SIGINTs, exits 3.
FAKE_SERVE_RUN = """
import shutil, signal, sys, time
from pathlib import Path
out, config = Path(sys.argv[1]), sys.argv[2]
received = []
signal.signal(signal.SIGINT, lambda *_: received.append("SIGINT"))
shutil.copy(config, out / "deployed.yaml")
(out / "config_path").write_text(config)
deadline = time.monotonic() + 60
while not received and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # room for a second, duplicated SIGINT
(out / "signals").write_text(" ".join(received))
sys.exit(3)
"""


def test_serve_hands_the_dry_run_yaml_to_serve_run_and_passes_ctrl_c_on_once(capsys, tmp_path, monkeypatch):
    script = tmp_path / "fake_serve_run.py"
    script.write_text(FAKE_SERVE_RUN)
    monkeypatch.setattr(launcher, "SERVE_RUN", [sys.executable, str(script), str(tmp_path)])
    flags = ["--config", str(TINY_CONFIG), "--sample_shift", "9", "--port", "8124"]

    def interrupt_once_running():
        deadline = time.monotonic() + 60
        while not (tmp_path / "config_path").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # what a Ctrl-C at the terminal delivers to wan-t2v

    interrupter = threading.Thread(target=interrupt_once_running)
    interrupter.start()
    try:
        assert cli.main(["serve", *flags]) == 3
    finally:
        interrupter.join()
    assert (tmp_path / "signals").read_text() == "SIGINT"
    assert not Path((tmp_path / "config_path").read_text()).exists()  # the temporary YAML is gone
    capsys.readouterr()
    assert yaml.safe_load((tmp_path / "deployed.yaml").read_text()) == dry_run(capsys, *flags)
