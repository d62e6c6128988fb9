"""End-to-end checks of `torchdiffusion train` / `sample` on a tiny model: resume parity, determinism, one-line errors.

RELIABILITY 1, 6, 8, 9, 14, 26, 27.
"""
import copy
import csv
import math
import pickle
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from fixtures_images import assert_same_seed_image

from torchdiffusion.cli.main import cli
from torchdiffusion.train.checkpoint import load_checkpoint, resolve_latest
from torchdiffusion.train.logger import TIMING_COLUMNS

TINY = [
    "data.limit=256", "data.val_split=val",
    "model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]", "model.backbone.num_res_blocks=1",
    "model.backbone.attn_resolutions=[14]", "model.backbone.norm_groups=4", "model.backbone.num_heads=2",
    "train.batch_size=8", "train.lr=0.001", "train.warmup_steps=5", "train.log_every=10", "train.val_every=10",
    "train.val_images=32", "train.sample_every=1000", "train.ckpt_every=20", "train.keep_last=5",
    "sample.steps=3", "sample.grid_images=4", "train.max_minutes=0", "train.fit_minutes=0", "train.precision=fp32",
]


def run(args, expect=0):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == expect, r.output
    return r


def train(run_dir, steps, extra=(), expect=0, resume=None, until=None):
    args = ["train", "--run", run_dir, "--no-progress"] + (["--until-step", until] if until else [])
    for s in TINY + [f"train.steps={steps}"] + list(extra):
        args += ["--set", s]
    if resume:
        args += ["--resume", resume]
    return run(args, expect)


def metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    train(d, 40)
    return d


def test_resume_parity_is_bit_exact(uninterrupted, tmp_path):
    """RELIABILITY 1 and 6: 40 steps vs 20 + resumed 20 -> identical weights, EMA, optimiser state, metrics."""
    d = tmp_path / "split"
    train(d, 40, until=20)
    assert load_checkpoint(resolve_latest(d / "checkpoints")).meta["trainer"]["step"] == 20
    train(d, 40)  # same run folder: resumes from the latest checkpoint
    a = load_checkpoint(resolve_latest(uninterrupted / "checkpoints"))
    b = load_checkpoint(resolve_latest(d / "checkpoints"))
    assert a.meta["trainer"]["step"] == b.meta["trainer"]["step"] == 40
    for group in ("model", "ema", "optim"):
        assert a.tensors[group].keys() == b.tensors[group].keys()
        for k in a.tensors[group]:
            assert torch.equal(a.tensors[group][k], b.tensors[group][k]), (group, k)
    assert a.meta["optim"] == b.meta["optim"]
    ma, mb = metrics(uninterrupted), metrics(d)
    assert len(ma) == 40 and [int(r["step"]) for r in ma] == list(range(1, 41))
    assert ma == mb
    assert ma[-1]["val_loss"] != ""


def test_ema_samples_are_byte_identical_after_resume(uninterrupted, tmp_path):
    d = tmp_path / "split"
    train(d, 40, until=20)
    train(d, 40)
    for src, out in ((uninterrupted, tmp_path / "a"), (d, tmp_path / "b")):
        run(["sample", "--run", src, "--outdir", out, "--seeds", "0-3", "--batch", "4"])
    for s in range(4):
        assert (tmp_path / "a" / f"{s:06d}.png").read_bytes() == (tmp_path / "b" / f"{s:06d}.png").read_bytes()


@pytest.mark.parametrize("sampler", ["heun", "ddpm", "ddim"])
def test_same_seed_same_png_at_any_batch(uninterrupted, tmp_path, sampler):
    """RELIABILITY 27: a seed's image does not depend on the batch it is drawn in (stochastic samplers too)."""
    extra = ["--sampler", sampler, "--steps", "4"] + (["--eta", "1.0"] if sampler == "ddim" else [])
    run(["sample", "--run", uninterrupted, "--outdir", tmp_path / "b1", "--seeds", "0-7", "--batch", "1"] + extra)
    run(["sample", "--run", uninterrupted, "--outdir", tmp_path / "b8", "--seeds", "0-7", "--batch", "8"] + extra)
    for s in range(8):
        assert_same_seed_image(tmp_path / "b1" / f"{s:06d}.png", tmp_path / "b8" / f"{s:06d}.png")
    assert (tmp_path / "b8" / "grid.png").exists()
    import json
    rec = json.loads((tmp_path / "b8" / "samples.json").read_text())
    assert set(rec["checkpoint_sha256"]) >= {"model.safetensors", "ema.safetensors"}
    assert rec["sampler"] == sampler and rec["count"] == 8 and len(rec["sigmas"]) == 5
    # different seeds give different images
    assert (tmp_path / "b8" / "000000.png").read_bytes() != (tmp_path / "b8" / "000001.png").read_bytes()


def test_resume_refuses_changed_architecture(uninterrupted, tmp_path):
    """RELIABILITY 8: a changed model/data config is refused, naming the changed keys."""
    import shutil
    d = tmp_path / "r"
    shutil.copytree(uninterrupted, d)
    r = train(d, 60, ["model.backbone.model_channels=16", "train.batch_size=16"], expect=1)
    assert "model.backbone.model_channels" in r.output and "train.batch_size" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_missing_resume_path_never_starts_fresh(tmp_path):
    r = train(tmp_path / "x", 10, resume=str(tmp_path / "nope"), expect=1)
    assert "does not exist" in r.output and not (tmp_path / "x" / "checkpoints").exists()


def test_unknown_config_key_is_one_line_with_suggestion(tmp_path):
    """RELIABILITY 26."""
    r = run(["train", "--run", tmp_path / "x", "--set", "train.stesp=5"], expect=2)
    assert r.output.strip().count("\n") == 0
    assert "train.stesp" in r.output and "did you mean 'steps'" in r.output
    r = run(["train", "--run", tmp_path / "x", "--set", "train.lr=fast"], expect=2)
    assert "train.lr" in r.output and "number" in r.output
    r = run(["train", "--run", tmp_path / "x", "--set", "model.head=epsilon"], expect=2)
    assert "valid: eps, x0, v, edm" in r.output
    r = run(["train", "--preset", "mnits"], expect=2)
    assert "did you mean 'mnist'" in r.output


def test_unknown_sampler_is_one_line(uninterrupted, tmp_path):
    r = run(["sample", "--run", uninterrupted, "--outdir", tmp_path, "--sampler", "eulr"], expect=2)
    assert "did you mean 'euler'" in r.output and "valid:" in r.output


def test_print_config_round_trips(tmp_path):
    import yaml
    r = run(["train", "--print-config", "--set", "train.steps=7"])
    data = yaml.safe_load(r.output)
    assert data["train"]["steps"] == 7 and data["data"]["kind"] == "mnist"
    p = tmp_path / "c.yaml"
    p.write_text(r.output)
    assert yaml.safe_load(run(["train", "--preset", str(p), "--print-config"]).output) == data


def test_python_yaml_tag_is_refused(tmp_path):
    """RELIABILITY 17: a !!python tag in a config is refused and never executed."""
    marker = tmp_path / "marker"
    p = tmp_path / "evil.yaml"
    p.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    r = run(["train", "--preset", str(p), "--print-config"], expect=2)
    assert "refused YAML tag" in r.output and not marker.exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_checkpoint_never_executes(uninterrupted, tmp_path):
    """RELIABILITY 14: a pickle passed where weights are loaded is refused; its payload never runs."""
    import shutil
    marker = tmp_path / "pwned"
    ck = tmp_path / "ck"
    shutil.copytree(resolve_latest(uninterrupted / "checkpoints"), ck)
    (ck / "ema.safetensors").write_bytes(pickle.dumps(_Evil(marker)))
    r = run(["sample", "--checkpoint", ck, "--outdir", tmp_path / "o", "--seeds", "0"], expect=1)
    assert "pickle" in r.output and "ema.safetensors" in r.output
    assert not marker.exists()
    assert len(r.output.strip().splitlines()) == 1


def test_truncated_checkpoint_is_one_line(uninterrupted, tmp_path):
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(resolve_latest(uninterrupted / "checkpoints"), ck)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[:-1])
    r = run(["sample", "--checkpoint", ck, "--outdir", tmp_path / "o", "--seeds", "0"], expect=1)
    assert "model.safetensors" in r.output and len(r.output.strip().splitlines()) == 1


def test_data_channel_mismatch_fails_before_training(tmp_path):
    """RELIABILITY 21: the model's shape comes from the data; a config that fixes another one fails in one line."""
    r = train(tmp_path / "x", 5, ["data.channels=RGB", "model.data_shape=[1,28,28]"], expect=2)
    assert "3 channel(s)" in r.output and "model.data_shape is [1, 28, 28]" in r.output
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_torchrun_two_processes_matches_one(tmp_path):
    """Two gloo processes with the same global batch follow the same loss curve as one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    sets = sum((["--set", s] for s in TINY + ["train.steps=12", "train.val_every=1000", "train.ckpt_every=12"]), [])
    base = ["-m", "torchdiffusion.cli.main", "train", "--no-progress", "--threads", "1"] + sets
    # (torchrun reads "--run" as an abbreviation of its own --run-path, so under torchrun it is spelled --run-dir)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable] + base + ["--run-dir", str(one)], check=True, env=env, capture_output=True)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(port)] + base + ["--run-dir", str(two)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    la = [float(r["loss"]) for r in metrics(one)]
    lb = [float(r["loss"]) for r in metrics(two)]
    assert len(la) == len(lb) == 12
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=2e-4, atol=1e-5)
    wa = load_checkpoint(resolve_latest(one / "checkpoints")).tensors["model"]
    wb = load_checkpoint(resolve_latest(two / "checkpoints")).tensors["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)


def test_train_and_sample_work_without_network(tmp_path, monkeypatch):
    """RELIABILITY 18: with sockets disabled, training and sampling on local files work."""
    import socket

    def no_network(*a, **k):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    train(tmp_path / "r", 4, ["train.ckpt_every=4"])
    run(["sample", "--run", tmp_path / "r", "--outdir", tmp_path / "o", "--seeds", "0-1", "--steps", "2"])
    assert (tmp_path / "o" / "000001.png").exists()


def test_bf16_autocast_trains(tmp_path):
    """The main job trains under bf16 autocast (backbone only): losses stay finite, weights stay float32."""
    train(tmp_path / "r", 4, ["train.precision=bf16", "train.ckpt_every=4"])
    assert all(math.isfinite(float(r["loss"])) for r in metrics(tmp_path / "r"))
    w = load_checkpoint(resolve_latest(tmp_path / "r" / "checkpoints")).tensors["model"]
    assert all(v.dtype == torch.float32 for v in w.values() if v.is_floating_point())


def test_sigkill_mid_run_then_resume_matches_uninterrupted(uninterrupted, tmp_path):
    """RELIABILITY 2: SIGKILL at an arbitrary step, then resume -> the same final weights as an uninterrupted
    run, and the metrics log has exactly one row per step."""
    import signal
    import time
    d = tmp_path / "killed"
    sets = sum((["--set", s] for s in TINY + ["train.steps=40", "train.ckpt_every=5"]), [])
    # same thread count as the in-process runs: float reductions are bit-exact only for equal thread counts
    threads = str(torch.get_num_threads())
    p = subprocess.Popen([sys.executable, "-m", "torchdiffusion.cli.main", "train", "--no-progress", "--threads",
                          threads, "--run", str(d)] + sets, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if (d / "metrics.csv").exists() and len((d / "metrics.csv").read_text().splitlines()) > 13:
                break
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    killed_at = len((d / "metrics.csv").read_text().splitlines()) - 1
    assert 12 <= killed_at < 40, killed_at
    train(d, 40, ["train.ckpt_every=5"])
    a = load_checkpoint(resolve_latest(uninterrupted / "checkpoints"))
    b = load_checkpoint(resolve_latest(d / "checkpoints"))
    for group in ("model", "ema"):
        for k in a.tensors[group]:
            assert torch.equal(a.tensors[group][k], b.tensors[group][k]), (group, k)
    assert metrics(d) == metrics(uninterrupted)


def test_folder_with_val_split_is_a_config_error(tmp_path):
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    for i in range(8):
        Image.new("L", (28, 28), color=i * 30).save(tmp_path / "imgs" / f"{i}.png")
    r = train(tmp_path / "r", 2, ["data.kind=folder", f"data.path={tmp_path / 'imgs'}", "data.channels=L"], expect=2)
    assert "data.val_split" in r.output and "null" in r.output
    train(tmp_path / "r", 2, ["data.kind=folder", f"data.path={tmp_path / 'imgs'}", "data.channels=L",
                              "data.val_split=null", "train.ckpt_every=2"])


def test_resume_check_fills_keys_an_older_release_did_not_store():
    """A checkpoint written before a config field existed resumes: the stored config is completed with today's
    defaults before the change check; a genuinely changed value is still reported."""
    from torchdiffusion.config.training import complete_config as _complete_config
    from torchdiffusion.config.schema import RunConfig
    from torchdiffusion.config.strict import to_dict
    from torchdiffusion.train.trainer import _diff_configs

    current = to_dict(RunConfig())
    old = copy.deepcopy(current)
    del old["model"]["sigma_data"]          # a field the older release did not have
    del old["train"]["lr"]
    assert _diff_configs(old, current)      # the raw comparison would refuse the resume
    assert _diff_configs(_complete_config(RunConfig, old), current) == []
    old["seed"] = 7
    assert _diff_configs(_complete_config(RunConfig, old), current) == ["seed"]
    old["no_such_section"] = {"x": 1}       # unknown keys are left for the check to list
    assert "no_such_section" in _diff_configs(_complete_config(RunConfig, old), current)
