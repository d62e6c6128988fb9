"""Progress of long work (pipelines/progress.py) and the training log's cadence: line records with an ETA on a
non-terminal, a tqdm bar on a terminal, nothing with --quiet, never on stdout; training's first log line after the
first step and then every train.log_seconds, with metrics.csv unchanged; optional TensorBoard."""
import csv
import io
import json
import sys

import pytest
from tiny_runs import SHORT_RUN, invoke, train_short, write_noise_pngs

from torchdiffusion.errors import ConfigError
from torchdiffusion.pipelines.progress import Progress, format_seconds
from torchdiffusion.train.logger import TIMING_COLUMNS, RunLogger

pytestmark = pytest.mark.usefixtures("one_thread")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_lines_first_then_every_period_with_an_eta():
    out, clock = io.StringIO(), Clock()
    p = Progress(100, "sample", every_s=10, stream=out, clock=clock)
    assert p.mode == "lines"  # StringIO is no terminal
    clock.t += 2
    p.update(10)  # the first update always reports
    clock.t += 5
    p.update(10)  # 5 s after the last record: quiet
    clock.t += 5
    p.update(20)  # 10 s: a record; 40 done in 12 s -> 10/3 per s, 60 left -> 18 s
    clock.t += 1
    p.set(100)  # done: the last record, whatever the period
    p.close()  # nothing more
    lines = out.getvalue().splitlines()
    assert lines[0] == "sample: 10/100 images (10%), 5.00 images/s, 2 s elapsed, ETA 18 s"
    assert lines[1] == "sample: 40/100 images (40%), 3.33 images/s, 12 s elapsed, ETA 18 s"
    assert lines[2].startswith("sample: 100/100 images (100%)") and lines[2].endswith("13 s elapsed, done")
    assert len(lines) == 3
    p = Progress(2000, "fast", stream=io.StringIO(), clock=clock)
    clock.t += 1
    p.update(1234)
    assert "1234 images/s" in p.stream.getvalue()


def test_callback_form_learns_the_total_and_close_reports_an_unfinished_job():
    out, clock = io.StringIO(), Clock()
    p = Progress(None, "reference", every_s=1e9, stream=out, clock=clock)
    clock.t += 4
    p(50, 200)  # progress(done, total) as extract_features calls it
    clock.t += 4
    p(100, 200)
    p.close()  # stopped early: a last record with the count reached
    lines = out.getvalue().splitlines()
    assert lines == ["reference: 50/200 images (25%), 12.5 images/s, 4 s elapsed, ETA 12 s",
                     "reference: 100/200 images (50%), 12.5 images/s, 8 s elapsed, ETA 8 s"]


def test_off_writes_nothing_and_a_terminal_gets_a_bar():
    out = io.StringIO()
    with Progress(10, "x", mode="off", stream=out) as p:
        p.update(10)
    assert out.getvalue() == ""
    tty = Tty()
    with Progress(4, "restore", stream=tty) as p:
        assert p.mode == "bar"
        p.update(4)
    text = tty.getvalue()
    assert "restore" in text and "4/4" in text and "\r" in text  # tqdm's in-place bar
    with pytest.raises(ValueError, match="valid: auto, bar, lines, off"):
        Progress(1, "x", mode="loud")


def test_format_seconds():
    assert [format_seconds(s) for s in (0.4, 59, 75, 3725)] == ["0 s", "59 s", "1 min 15 s", "1 h 02 min"]


def test_commands_report_on_stderr_only_and_quiet_silences(tiny_run, tmp_path):
    r = invoke(["sample", "--run", tiny_run, "--outdir", tmp_path / "a", "--seeds", "0-3", "--batch", "2",
                "--steps", "2"])
    err = r.stderr.splitlines()
    assert err[0].startswith("sample: 2/4 images (50%)") and "ETA" in err[0]
    assert err[-1].startswith("sample: 4/4 images (100%)") and err[-1].endswith("done")
    assert "sample:" not in r.stdout and r.stdout.startswith("wrote 4 images")
    quiet = invoke(["sample", "--run", tiny_run, "--outdir", tmp_path / "b", "--seeds", "0-3", "--steps", "2",
                    "--quiet"])
    assert quiet.stderr == ""
    images = write_noise_pngs(tmp_path / "in", 2)
    r = invoke(["restore", "--run", tiny_run, "--task", "deblur", "--method", "replacement", "--input", images,
                "--outdir", tmp_path / "r", "--steps", "2", "--batch", "1"])
    assert r.stderr.splitlines()[0].startswith("restore: 1/2 images") and "restore:" not in r.stdout


def test_eval_prints_json_on_stdout_and_progress_on_stderr(tiny_run, tmp_path):
    """eval's feature extraction reports on stderr; stdout stays one JSON document (a tiny classifier as the
    feature network, so no Inception is needed)."""
    invoke(["train-classifier", "--run", tmp_path / "clf", "--steps", "2", "--batch-size", "16", "--width", "8",
            "--set", "data.limit=32", "--threads", "1"])
    invoke(["sample", "--run", tiny_run, "--outdir", tmp_path / "s", "--seeds", "0-7", "--steps", "2", "--quiet"])
    base = ["eval", "kid", "--real", tmp_path / "s", "--fake", tmp_path / "s", "--classifier", tmp_path / "clf",
            "--kid-subsets", "2", "--kid-subset-size", "4", "--cache-dir", tmp_path / "cache"]
    r = invoke(base)
    assert json.loads(r.stdout)["n_fake"] == 8
    assert any(ln.startswith("generated: 8/8 images (100%)") for ln in r.stderr.splitlines())
    quiet = invoke(base + ["--quiet"])
    assert json.loads(quiet.stdout)["n_fake"] == 8 and "images/s" not in quiet.stderr


def _log_lines(run):
    return [ln for ln in (run / "log.txt").read_text().splitlines() if "] step " in ln]


def _rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def test_training_logs_after_the_first_step_and_by_seconds(tmp_path):
    steps = 3
    train_short(tmp_path / "a", steps, ["train.log_every=1000", "train.log_seconds=0"])
    train_short(tmp_path / "b", steps, ["train.log_every=1000", "train.log_seconds=0.000000001"])
    a, b = _log_lines(tmp_path / "a"), _log_lines(tmp_path / "b")
    assert [ln.split("] ")[1].split()[1] for ln in a] == ["1/3", "3/3"]  # first step, last step
    assert [ln.split("] ")[1].split()[1] for ln in b] == ["1/3", "2/3", "3/3"]  # every step by the clock
    assert "ETA" in a[0] and "ETA" not in a[-1]
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")  # the log's cadence never changes metrics.csv
    with pytest.raises(ValueError, match="log_seconds must be >= 0"):
        from torchdiffusion.train.trainer import TrainConfig
        TrainConfig(log_seconds=-1)


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(ConfigError, match="needs the tensorboard package.*pip install tensorboard"):
        RunLogger(tmp_path / "run", 10, 0, tensorboard=True)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    args = ["train", "--run", tmp_path / "t", "--no-progress", "--threads", "1"]
    for s in SHORT_RUN + ["train.steps=2", "train.tensorboard=true"]:
        args += ["--set", s]
    r = invoke(args, expect=2)
    assert r.output.count("\n") == 1 and "pip install tensorboard" in r.output
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_tensorboard_scalars_are_the_metrics_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "tb"
    train_short(run, 3, ["train.tensorboard=true", "train.sample_every=3"], until=2)  # stopped, then resumed:
    train_short(run, 3, ["train.tensorboard=true", "train.sample_every=3"])  # one event per step still
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for tag in ("loss", "lr", "grad_norm", "val_loss"):
        csv_values = {int(r["step"]): float(r[tag]) for r in rows if r[tag]}
        events = {e.step: e.value for e in acc.Scalars(tag)}
        assert len(acc.Scalars(tag)) == len(events)
        assert events.keys() == csv_values.keys() and all(
            abs(events[k] - v) <= 1e-6 * max(1.0, abs(v)) for k, v in csv_values.items())
    assert [e.step for e in acc.Images("samples")] == [3]
    json.dumps(acc.Tags())  # the event file reads back whole
