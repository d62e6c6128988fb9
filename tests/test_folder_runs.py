"""Image folders like the built-in sets: the hash-chosen held-out split (data.val_fraction), class names recorded
in the run and accepted by --labels, `data prepare` (EDM's dataset.json layout) and reading it back."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tiny_runs import invoke
from torchdiffusion.cli.common import parse_labels
from torchdiffusion.config.build import build_data
from torchdiffusion.config.schema import DataConfig
from torchdiffusion.data import load_image_folder
from torchdiffusion.data.folder import held_out
from torchdiffusion.errors import ConfigError, DataError, OutputError
from torchdiffusion.pipelines.prepare import prepare_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(ds) -> set[int]:
    """Each test image is filled with its own id (0..255): the set of ids a data set holds."""
    return {int(v) for v in ds.x[:, 0, 0, 0]}


def _id_folder(root, ids, classes=("circle", "square"), size=8):
    for i in ids:
        d = root / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        Image.new("L", (size, size), color=i).save(d / f"img{i:03d}.png")
    return root


# --------------------------------------------------------------------------------------------- the split
def test_held_out_is_the_documented_hash_rule():
    for name in ("a.png", "circle/img001.png", "ünï/çødé.png"):
        h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
        for f in (0.01, 0.3, 0.5, 0.99):
            assert held_out(name, f) == (h < f * 2 ** 64)
    share = np.mean([held_out(f"x/{i}.png", 0.25) for i in range(4000)])
    assert abs(share - 0.25) < 0.03  # 4 standard errors of a fair hash


def test_val_fraction_splits_disjointly_and_adding_files_moves_no_other(tmp_path):
    root = _id_folder(tmp_path / "imgs", range(60))
    train = load_image_folder(root, labels="folder", split="train", val_fraction=0.3)
    val = load_image_folder(root, labels="folder", split="val", val_fraction=0.3)
    both = load_image_folder(root, labels="folder", split="train+val", val_fraction=0.3)
    assert _ids(train).isdisjoint(_ids(val)) and _ids(train) | _ids(val) == _ids(both) == set(range(60))
    assert 5 <= len(val) <= 35 and train.class_names == val.class_names == ("circle", "square")
    expected = {i for i in range(60) if held_out(f"{('circle', 'square')[i % 2]}/img{i:03d}.png", 0.3)}
    assert _ids(val) == expected
    for ds in (train, val):  # labels follow the subfolders in both splits
        assert torch.equal(ds.label, ds.x[:, 0, 0, 0].long() % 2)
    _id_folder(root, range(60, 120))  # more files: none of the first 60 changes side
    val2 = load_image_folder(root, labels="folder", split="val", val_fraction=0.3)
    assert {i for i in _ids(val2) if i < 60} == _ids(val)
    assert load_image_folder(root, split="train").x.shape[0] == 120  # no val_fraction: one split of every file


def test_val_split_of_a_folder_without_fraction_is_one_line(tmp_path):
    root = _id_folder(tmp_path / "imgs", range(4))
    cfg = DataConfig(kind="folder", path=str(root), channels="L")
    with pytest.raises(ConfigError) as e:
        build_data(cfg, "val")
    msg = str(e.value)
    assert "data.val_fraction" in msg and "data.val_split=null" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="data.split=train"):
        build_data(DataConfig(kind="folder", path=str(root), channels="L", split="val"))
    with pytest.raises(DataError, match="holds none of the 4"):
        build_data(DataConfig(kind="folder", path=str(root), channels="L", val_fraction=0.001), "val")
    with pytest.raises(ConfigError, match="applies to image folders"):
        build_data(DataConfig(kind="mnist", val_fraction=0.1))


# --------------------------------------------------------------------------------------------- --labels
def test_parse_labels_takes_class_names_and_integers():
    names = ("circle", "square", "T-shirt/top")
    assert parse_labels("circle,square", names) == [0, 1]
    assert parse_labels("Square, 0-1,T-shirt/top", names) == [1, 0, 1, 2]
    assert parse_labels("0-2") == [0, 1, 2]
    with pytest.raises(ConfigError) as e:
        parse_labels("circel", names)
    assert "circle, square, T-shirt/top (or labels 0..2)" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--labels 'circle' is not valid"):
        parse_labels("circle")
    with pytest.raises(ConfigError, match="--labels 'x' is not valid"):  # names that are the integers add nothing
        parse_labels("x", tuple(str(k) for k in range(10)))
    assert parse_labels("3", tuple(str(k) for k in range(10))) == [3]


# --------------------------------------------------------------------------------------------- data prepare
def _class_source(root):
    """Two class folders of odd-sized images: red discs on white (RGB, 40x30) and gray squares (L, 30x34)."""
    from PIL import ImageDraw
    for i in range(5):
        (root / "circle").mkdir(parents=True, exist_ok=True)
        (root / "square").mkdir(parents=True, exist_ok=True)
        im = Image.new("RGB", (40, 30), (255, 255, 255))
        ImageDraw.Draw(im).ellipse((10, 5, 30, 25), fill=(200, 10 * i, 0))
        im.save(root / "circle" / f"c{i}.png")
        im = Image.new("L", (30, 34), 255)
        ImageDraw.Draw(im).rectangle((5, 5, 20, 20), fill=20 * i)
        im.save(root / "square" / f"s{i}.jpg", quality=95)
    (root / "square" / "broken.png").write_bytes(b"")
    return root


def test_prepare_writes_edm_layout_that_reads_back(tmp_path):
    src = _class_source(tmp_path / "src")
    out = tmp_path / "d.zip"
    r = prepare_dataset(src, out, resolution=16)
    assert (r.count, r.shape, r.labels, r.class_names) == (10, (3, 16, 16), "folder", ("circle", "square"))
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        meta = json.loads(zf.read("dataset.json"))
    assert names[-1] == "dataset.json" and all(not n.startswith("/") and ".." not in n for n in names)
    assert meta["labels"] == [[n, int(n.startswith("square"))] for n in names[:-1]]
    assert meta["class_names"] == ["circle", "square"]
    direct = load_image_folder(src, channels="RGB", resolution=16, bad_files="skip", labels="folder")
    for labels in ("json", "folder"):
        back = load_image_folder(out, channels="auto", labels=labels)
        assert torch.equal(back.x, direct.x) and torch.equal(back.label, direct.label)  # PNG is lossless
        assert back.class_names == ("circle", "square")
    before = out.read_bytes()
    with pytest.raises(OutputError, match="--overwrite"):
        prepare_dataset(src, out, resolution=16)
    assert prepare_dataset(src, out, resolution=16, overwrite=True).count == 10
    assert out.read_bytes() == before  # deterministic: same input, same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zip", "src"]  # no temporary file left


def test_prepare_channels_crop_and_unlabelled(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = (255, 0, 0)  # the left quarter red, the rest black
    Image.fromarray(a).save(src / "wide.png")
    r = prepare_dataset(src, tmp_path / "none.zip", resolution=8, crop="none", channels=3)
    assert r.labels == "none" and r.class_names == ()
    x = load_image_folder(tmp_path / "none.zip").x
    assert x.shape == (1, 3, 8, 8) and x[0, 0, :, 0].min() > 200 and x[0, 0, :, -1].max() < 30
    x = load_image_folder(prepare_dataset(src, tmp_path / "c.zip", resolution=8, channels=3).out).x
    assert x[0, 0].max() < 30  # the centred 20x20 square has no red
    g = load_image_folder(prepare_dataset(src, tmp_path / "g.zip", resolution=8, channels=1, crop="none").out).x
    assert g.shape == (1, 1, 8, 8)
    with zipfile.ZipFile(tmp_path / "none.zip") as zf:
        assert zf.namelist() == ["00000/img00000000.png", "dataset.json"]
        assert json.loads(zf.read("dataset.json"))["labels"] is None


def test_prepare_failure_keeps_the_old_output_and_leaves_no_debris(tmp_path, monkeypatch):
    src = _class_source(tmp_path / "src")
    out = tmp_path / "d.zip"
    out.write_bytes(b"old")

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(DataError) as e:
        prepare_dataset(src, out, resolution=8, overwrite=True)
    assert "No space left on device" in str(e.value) and "\n" not in str(e.value)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["d.zip", "src"]


def test_prepare_cli_refusals_are_one_line(tmp_path):
    src = _class_source(tmp_path / "src")
    r = invoke(["data", "prepare", src, "--out", tmp_path / "d.zip", "--resolution", "8", "--channels", "1"])
    assert "wrote" in r.output and "10 images, 8x8, 1 channel(s), labels from folder: 2 classes" in r.output
    r = invoke(["data", "prepare", src, "--out", tmp_path / "d.zip", "--resolution", "8"], expect=1)
    assert r.output.count("\n") == 1 and "--overwrite" in r.output
    r = invoke(["data", "prepare", src, "--out", tmp_path / "d.tar", "--resolution", "8"], expect=2)
    assert ".zip" in r.output


def test_label_json_must_cover_every_image(tmp_path):
    z = tmp_path / "d.zip"
    buf = Image.new("L", (8, 8)).tobytes()
    with zipfile.ZipFile(z, "w") as zf:
        for n in ("a.png", "b.png"):
            import io
            f = io.BytesIO()
            Image.frombytes("L", (8, 8), buf).save(f, format="PNG")
            zf.writestr(n, f.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": [["a.png", 0]]}))
    with pytest.raises(DataError, match="1 image\\(s\\) have no label \\(e.g. 'b.png'\\)"):
        load_image_folder(z, labels="json")
    with pytest.raises(DataError, match="needs a dataset.json"):
        load_image_folder(_id_folder(tmp_path / "f", range(2)), labels="json")


# --------------------------------------------------------------------------------------------- a folder run
RUN = ["data.kind=folder", "data.channels=L", "data.labels=folder", "data.val_split=val", "data.val_fraction=0.3",
       "cond.label.kind=class", "model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]",
       "model.backbone.num_res_blocks=1", "model.backbone.attn_resolutions=[]", "model.backbone.norm_groups=4",
       "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1", "train.val_every=2", "train.val_images=4",
       "train.sample_every=1000", "train.ckpt_every=2", "train.steps=2", "train.max_minutes=0",
       "train.precision=fp32", "sample.steps=2", "sample.grid_images=2"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folder_run")
    imgs = _id_folder(tmp / "imgs", range(24))
    args = ["train", "--run", tmp / "run", "--no-progress", "--threads", "1", "--set", f"data.path={imgs}"]
    for s in RUN:
        args += ["--set", s]
    invoke(args)
    return tmp / "run"


def test_folder_run_records_class_names_and_a_validation_loss(folder_run):
    cfg = yaml.safe_load((folder_run / "config.yaml").read_text())
    assert cfg["data"]["class_names"] == ["circle", "square"] and cfg["cond"]["label"]["num_classes"] == 2
    rows = (folder_run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "val_loss" in header and rows[-1].split(",")[header.index("val_loss")] != ""


def test_sample_accepts_class_names(folder_run, tmp_path):
    invoke(["sample", "--run", folder_run, "--seeds", "0-3", "--labels", "square,circle", "--outdir", tmp_path / "s",
            "--threads", "1"])
    rec = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert rec["label_per_seed"] == [1, 0, 1, 0] and rec["labels"] == "square,circle"
    r = invoke(["sample", "--run", folder_run, "--seeds", "0", "--labels", "triangle", "--outdir", tmp_path / "t"],
               expect=2)
    assert r.output.strip() == ("error: --labels: 'triangle' is not a class of this run; valid: circle, square "
                                "(or labels 0..1)")


def test_likelihood_audit_and_eval_cond_use_the_held_out_split(folder_run, tmp_path):
    r = invoke(["likelihood", "--run", folder_run, "--n", "2", "--estimator", "ode", "--rtol", "1e-2", "--atol",
                "1e-2", "--threads", "1", "--out", tmp_path / "l.json"])
    assert json.loads((tmp_path / "l.json").read_text())["split"] == "val" and "split val" in r.output
    invoke(["audit", "--run", folder_run, "--n", "2", "--steps", "2", "--features", "none", "--out",
            tmp_path / "audit", "--threads", "1"])
    invoke(["eval-cond", "--run", folder_run, "--n", "4", "--features", "random-conv", "--steps", "2", "--metrics",
            "fid", "--strategy", "empirical", "--threads", "1", "--out", tmp_path / "c.json"])
    assert (tmp_path / "c.json").is_file()


def test_resume_of_a_run_that_predates_class_names(folder_run):
    """A checkpoint written before data.class_names existed resumes: the key takes the value the data give."""
    from torchdiffusion.config.schema import RunConfig
    from torchdiffusion.config.training import complete_config
    from torchdiffusion.train.trainer import _diff_configs
    current = yaml.safe_load((folder_run / "config.yaml").read_text())
    old = json.loads(json.dumps(current))
    del old["data"]["class_names"]
    assert _diff_configs(complete_config(RunConfig, old), current) == ["data.class_names"]
    assert _diff_configs(complete_config(RunConfig, old, current), current) == []
    old["data"]["class_names"] = ["a", "b"]  # a stored value is never replaced
    assert _diff_configs(complete_config(RunConfig, old, current), current) == ["data.class_names"]


def test_the_python_api_takes_the_recorded_class_names(folder_run):
    import torchdiffusion
    pipe = torchdiffusion.load(folder_run)
    assert pipe.class_names == ("circle", "square")
    by_name = pipe.sample([0, 1], steps=2, labels="square,circle")
    assert torch.equal(by_name, pipe.sample([0, 1], steps=2, labels=[1, 0]))
    assert not torch.equal(by_name, pipe.sample([0, 1], steps=2, labels=[0, 1]))  # the label matters
