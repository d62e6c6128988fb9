"""Everyday fixes found by using the commands as a new user would: restore on class-conditional models and its
output names, training time across resumes, the warm-up warning, sample's --outdir policy, eval's early
refusals and shared reference cache, exit codes and the listings."""
import json

import numpy as np
import pytest
from PIL import Image
from tiny_runs import TINY_RUN, invoke, train_short, write_noise_pngs

pytestmark = pytest.mark.usefixtures("one_thread")


def train_tiny(run_dir, extra=()):
    args = ["train", "--run", run_dir, "--no-progress", "--threads", "1"]
    for s in TINY_RUN + list(extra):
        args += ["--set", s]
    return invoke(args)


@pytest.fixture(scope="module")
def cond_runs(tmp_path_factory):
    """Two tiny class-conditional runs: with label dropout (p_uncond 0.1, the default) and without."""
    d = tmp_path_factory.mktemp("cond")
    train_tiny(d / "drop", ["cond.label.kind=class"])
    train_tiny(d / "nodrop", ["cond.label.kind=class", "cond.label.p_uncond=0"])
    images = write_noise_pngs(d / "images", 3)
    return d, images


# ------------------------------------------------------------------------------------------------ restore
def restore(run, images, out, extra=(), expect=0):
    return invoke(["restore", "--run", run, "--task", "inpaint", "--method", "replacement", "--input", images,
                   "--outdir", out, "--steps", 2, "--threads", 1] + list(extra), expect=expect)


def test_restore_class_conditional_null_or_labels(cond_runs, tmp_path):
    d, images = cond_runs
    restore(d / "drop", images, tmp_path / "null")
    rec = json.loads((tmp_path / "null" / "restore.json").read_text())
    assert rec["condition"] == "null" and rec["labels"] is None
    restore(d / "drop", images, tmp_path / "l3", ["--labels", "3"])
    restore(d / "drop", images, tmp_path / "l012", ["--labels", "0-2"])
    assert json.loads((tmp_path / "l3" / "restore.json").read_text())["labels"] == [3, 3, 3]
    rec = json.loads((tmp_path / "l012" / "restore.json").read_text())
    assert rec["condition"] == "labels" and rec["labels"] == [0, 1, 2]

    def pixels(out, name):
        return np.asarray(Image.open(out / "restored" / name))
    # same seeds, same measurement: the label is what changes the restoration (image 1 has label 3 vs 1)
    assert not np.array_equal(pixels(tmp_path / "l3", "1.png"), pixels(tmp_path / "l012", "1.png"))
    assert not np.array_equal(pixels(tmp_path / "null", "1.png"), pixels(tmp_path / "l3", "1.png"))


def test_restore_refusals_leave_nothing(cond_runs, tiny_run, tmp_path):
    d, images = cond_runs
    r = restore(d / "nodrop", images, tmp_path / "a", expect=2)
    assert "p_uncond=0" in r.output and "--labels" in r.output and r.output.strip().count("\n") == 0
    r = restore(d / "drop", images, tmp_path / "b", ["--labels", "0,1"], expect=2)
    assert "2 labels for 3 images" in r.output
    r = restore(d / "drop", images, tmp_path / "c", ["--labels", "10"], expect=2)
    assert "out of range" in r.output
    r = restore(tiny_run, images, tmp_path / "d", ["--labels", "1"], expect=2)
    assert "class-conditional" in r.output
    # a method refusing its operator inside the solve (ilvr needs down-sampling) writes no folders either
    r = invoke(["restore", "--run", d / "drop", "--task", "inpaint", "--method", "ilvr", "--input", images,
                "--outdir", tmp_path / "e", "--steps", 2], expect=2)
    assert not any((tmp_path / n).exists() for n in "abcde")
    restore(d / "nodrop", images, tmp_path / "f", ["--labels", "2"])  # with labels it works


def test_restore_keeps_input_names(tiny_run, tmp_path):
    src = tmp_path / "in"
    (src / "cats").mkdir(parents=True)
    g = np.random.default_rng(1)
    for name in ("cats/tom.png", "b.jpg", "b.png", "zeta.bmp"):
        Image.fromarray(g.integers(0, 256, (28, 28), dtype=np.uint8)).save(src / name)
    out = tmp_path / "out"
    restore(tiny_run, src, out)
    rec = json.loads((out / "restore.json").read_text())
    assert sorted(rec["inputs"]) == ["b.jpg", "b.png", "cats/tom.png", "zeta.bmp"]
    expect = {"b.jpg": "b.jpg.png", "b.png": "b.png.png", "cats/tom.png": "cats/tom.png", "zeta.bmp": "zeta.png"}
    assert rec["outputs"] == [expect[i] for i in rec["inputs"]]
    for sub in ("restored", "measurement"):
        assert sorted(str(p.relative_to(out / sub)) for p in (out / sub).rglob("*.png")) == sorted(expect.values())


# ------------------------------------------------------------------------------------------------ training
def test_training_time_accumulates_across_resumes(tmp_path):
    import csv

    from torchdiffusion.train.checkpoint import load_checkpoint, resolve_latest
    run = tmp_path / "run"
    train_short(run, 4, until=2)
    first = load_checkpoint(resolve_latest(run / "checkpoints")).meta["trainer"]["wall_s"]
    train_short(run, 4)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    walls = [float(r["wall_s"]) for r in rows]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert first > 0 and walls[2] > first and walls == sorted(walls)  # the resumed part starts at the first's time
    final = load_checkpoint(resolve_latest(run / "checkpoints")).meta["trainer"]["wall_s"]
    assert final >= walls[-1]


def test_steps_fewer_than_warmup_warns(tmp_path):
    r = train_tiny(tmp_path / "a", ["train.warmup_steps=10"])
    warn = [line for line in r.output.splitlines() if "warning:" in line]
    assert len(warn) == 1 and "2 steps are fewer than the 10 warm-up" in warn[0] and "20%" in warn[0]  # lr(1) = 2/10
    r = train_tiny(tmp_path / "b")
    assert "warning:" not in r.output


# ------------------------------------------------------------------------------------------------ sample --outdir
def test_sample_never_mixes_old_and_new(tiny_run, tmp_path):
    out = tmp_path / "s"
    base = ["sample", "--run", tiny_run, "--outdir", out, "--steps", 1, "--threads", 1]
    invoke(base + ["--seeds", "0-2"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"000000.png", "000001.png", "000002.png", "grid.png", "samples.json"}
    r = invoke(base + ["--seeds", "5"], expect=1)
    assert "not empty" in r.output and "--overwrite" in r.output and r.output.strip().count("\n") == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the refusal touched nothing
    invoke(base + ["--seeds", "5", "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["000005.png", "grid.png", "samples.json"]
    assert json.loads((out / "samples.json").read_text())["seeds"] == "5"
    (out / "notes.txt").write_text("mine")
    r = invoke(base + ["--seeds", "6", "--overwrite"], expect=1)
    assert "notes.txt" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["000005.png", "grid.png", "notes.txt", "samples.json"]


# ------------------------------------------------------------------------------------------------ eval
class CountingExtractor:
    """A FeatureExtractor (eval.extractors) of per-row pixel means, counting the images it is given."""

    name, sha256, resize = "counting", "0" * 64, "none"

    def __init__(self):
        self.images = 0

    def __call__(self, images):
        import torch
        self.images += len(images)
        x = torch.as_tensor(images).double().flatten(2).mean(1)  # (N, H*W)
        return x.reshape(len(images), -1)[:, ::28].numpy()  # (N, 28): one pixel column


@pytest.fixture
def counting(monkeypatch):
    """Every command's feature network replaced by one CountingExtractor."""
    import torchdiffusion.cli.common as common
    import torchdiffusion.cli.eval_cmd as eval_cmd
    ex = CountingExtractor()
    monkeypatch.setattr(eval_cmd, "make_extractor", lambda *a, **k: ex)
    monkeypatch.setattr(common, "make_extractor", lambda *a, **k: ex)
    return ex


def pngs(folder, n, seed):
    folder.mkdir(parents=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(g.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return folder


@pytest.mark.parametrize("metric,extra,needle,code", [
    ("fid", ["--min-n", "20"], "5 reference images is fewer than the minimum 20", 1),
    ("kid", ["--kid-subsets", "0"], "subsets must be >= 1", 2),
    ("pr", ["--pr-k", "5"], "k = 5 needs more than 5", 1),
    ("all", ["--min-n", "4", "--pr-k", "6"], "k = 6 needs more than 6", 1),
])
def test_eval_refuses_before_any_feature(counting, tmp_path, metric, extra, needle, code):
    """A side too small (or a bad option) is refused before the extractor sees one image, real or generated."""
    real, fake = pngs(tmp_path / "real", 5, 0), pngs(tmp_path / "fake", 30, 1)
    r = invoke(["eval", metric, "--real", real, "--fake", fake, "--cache-dir", tmp_path / "c"] + extra, expect=code)
    assert needle in r.output and r.output.strip().count("\n") == 0
    assert counting.images == 0 and not (tmp_path / "c").exists()


def test_eval_commands_offer_only_their_own_options(tmp_path):
    from torchdiffusion.cli.eval_cmd import eval_group
    own = {"fid": {"--min-n", "--allow-small-n"}, "kid": {"--kid-subsets", "--kid-subset-size", "--seed"},
           "pr": {"--pr-k"}}
    for name, cmd in eval_group.commands.items():
        if name not in ("fid", "kid", "pr", "all"):
            continue
        opts = {o for p in cmd.params for o in p.opts}
        for metric, names in own.items():
            assert (names <= opts) == (name in (metric, "all")), (name, metric)
    r = invoke(["eval", "kid", "--real", tmp_path, "--fake", tmp_path, "--min-n", "3"], expect=2)
    assert "--min-n" in r.output and "--allow-small-n" not in r.output


def test_eval_reuses_the_features_audit_cached(counting, tmp_path):
    train, held, samples = pngs(tmp_path / "train", 12, 0), pngs(tmp_path / "held", 6, 1), pngs(tmp_path / "s", 8, 2)
    cache = tmp_path / "cache"
    invoke(["audit", "--images", samples, "--train-dir", train, "--heldout-dir", held, "--heldout", 6,
            "--cache-dir", cache, "--out", tmp_path / "audit"])
    assert counting.images == 12 + 6 + 8  # training (cached), held-out and samples
    counting.images = 0
    r = invoke(["eval", "kid", "--real", train, "--fake", samples, "--cache-dir", cache, "--kid-subsets", 2])
    res = json.loads(r.stdout)
    assert res["reference_cache_hit"] is True and counting.images == 8  # only the generated side
    assert len(list(cache.glob("*.npz"))) == 1  # one cache file for both commands


# ------------------------------------------------------------------------------------------------ advice
def test_folder_split_advice_only_when_it_applies(tmp_path):
    """likelihood on a folder run (data.val_split already null) is not told to set data.val_split=null."""
    from torchdiffusion.config.build import build_data
    from torchdiffusion.config.schema import DataConfig
    from torchdiffusion.errors import ConfigError
    folder = write_noise_pngs(tmp_path / "images", 8)
    cfg = DataConfig(kind="folder", path=str(folder), val_split=None, channels="L")
    with pytest.raises(ConfigError) as e:
        build_data(cfg, "test")
    assert "val_split=null" not in str(e.value) and "ask for split 'train'" in str(e.value)
    with pytest.raises(ConfigError, match="set data.val_split=null"):
        build_data(DataConfig(kind="folder", path=str(folder), val_split="val", channels="L"), "val")
    run = tmp_path / "run"
    train_tiny(run, ["data.kind=folder", f"data.path={folder}", "data.channels=L", "data.limit=null"])
    r = invoke(["likelihood", "--run", run, "--n", 2, "--threads", 1], expect=2)
    assert "val_split" not in r.output and "'train'" in r.output


# ------------------------------------------------------------------------------------------------ exit codes
def test_exit_code_table_is_applied_and_documented(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    import torch

    import torchdiffusion.cli.list_cmd as list_cmd
    from torchdiffusion import errors
    assert errors.ConfigError.exit_code == errors.EXIT_USAGE == 2
    for cls in (errors.DataError, errors.CheckpointError, errors.OutputError, errors.TorchDiffusionError):
        assert cls.exit_code == errors.EXIT_REFUSED == 1
    from torchdiffusion.train.trainer import EXIT_PREEMPTED
    assert EXIT_PREEMPTED == errors.EXIT_PREEMPTED == 75
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", doc, re.M)}
    assert documented == set(errors.EXIT_CODES)
    # the command line: usage 2 (a project ConfigError and click's own), refusal 1, out of memory 1, Ctrl-C 130
    invoke(["sample", "--run", tmp_path / "none", "--outdir", tmp_path / "o"], expect=2)
    invoke(["list", "sampler"], expect=2)
    invoke(["eval", "fid", "--real", tmp_path / "x.npz", "--fake", tmp_path], expect=1)
    for exc, code in ((KeyboardInterrupt(), 130), (torch.OutOfMemoryError("CUDA out of memory"), 1),
                      (errors.OutputError("full"), 1)):
        def boom(what, exc=exc):
            raise exc
        monkeypatch.setattr(list_cmd, "listing", boom)
        r = invoke(["list", "samplers"], expect=code)
        assert r.output.strip().count("\n") == 0 and "Traceback" not in r.output


# ------------------------------------------------------------------------------------------------ listings
def test_listings_have_one_described_line_per_name():
    from torchdiffusion.config import registry
    from torchdiffusion.config.presets_io import preset_names
    assert set(registry.SAMPLER_SUMMARIES) == set(registry.SAMPLERS)
    assert set(registry.INVERSE_SUMMARIES) == set(registry.INVERSE_METHODS)
    for what, names in (("samplers", list(registry.SAMPLERS)), ("methods", list(registry.INVERSE_METHODS)),
                        ("presets", preset_names())):
        lines = invoke(["list", what]).output.strip().splitlines()
        assert [line.split()[0] for line in lines] == names
        assert all(len(line.split()) >= 4 for line in lines), lines  # a name and a description
    assert "replacement (pocs)" in invoke(["list", "methods"]).output


def test_version_and_debug_after_the_command(tmp_path):
    import torchdiffusion
    assert invoke(["--version"]).output.strip() == f"torchdiffusion {torchdiffusion.__version__}"
    args = ["--run", tmp_path / "none", "--outdir", tmp_path / "o"]
    r = invoke(["sample"] + args, expect=2)
    assert r.output.startswith("error:") and r.output.strip().count("\n") == 0
    from click.testing import CliRunner

    from torchdiffusion.cli.main import cli
    from torchdiffusion.errors import ConfigError
    for argv in (["--debug", "sample"] + args, ["sample", "--debug"] + args, ["sample"] + args + ["--debug"]):
        r = CliRunner().invoke(cli, [str(a) for a in argv])
        assert isinstance(r.exception, ConfigError), argv  # raised, not turned into one line
    r = CliRunner().invoke(cli, ["eval", "fid", "--debug", "--real", "x", "--fake", str(tmp_path / "none")])
    assert r.exception is not None and not isinstance(r.exception, SystemExit)


def test_readme_lists_every_command():
    from pathlib import Path

    from torchdiffusion.cli.main import cli
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [name for name in cli.commands if f"torchdiffusion {name} " not in readme]
    assert not missing, f"README's command list lacks {missing}"
    assert "torchdiffusion --version" in readme
