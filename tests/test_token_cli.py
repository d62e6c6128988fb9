"""`train-tokens` / `sample-tokens` end to end on a randomly initialised VQ run (tests/latent_runs.py)."""
import shutil

from latent_runs import make_ae_run
from tiny_runs import invoke

TINY_TOKENS = ["data.kind=mnist", "data.limit=32", "data.val_split=val", "data.resolution=32", "backbone.width=32",
               "backbone.depth=1", "backbone.heads=2", "backbone.noise_freqs=16", "process.steps=10",
               "train.steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1",
               "train.sample_every=2", "train.ckpt_every=2", "train.val_every=2", "train.val_images=8",
               "train.max_minutes=0", "train.precision=fp32", "sample.steps=3", "sample.grid_images=2"]


def test_train_and_sample_tokens_through_the_vq_decoder(tmp_path):
    vq = make_ae_run(tmp_path / "vq", "vq")  # 16 codes, f = 4: 8 x 8 tokens of 32 x 32 MNIST images
    run = tmp_path / "tok"
    args = ["train-tokens", "--preset", "fashion-vq-tokens", "--run", run, "--no-progress", "--threads", "1",
            "--set", f"vq_run={vq}"]
    for s in TINY_TOKENS:
        args += ["--set", s]
    invoke(args)
    assert (run / "samples" / "grid_00000002.png").exists()
    cfg = (run / "config.yaml").read_text()
    assert "num_classes: 16" in cfg and "vq_fingerprint: " in cfg
    out = tmp_path / "out"
    r = invoke(["sample-tokens", "--run", run, "--seeds", "0-3", "--outdir", out, "--sampler", "ancestral",
                "--steps", "4"])
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png", "000003.png",
                                                     "grid.png", "samples.json"]
    made = __import__("json").loads((out / "samples.json").read_text())
    assert (made["sampler"], made["steps"], made["count"], made["seeds"], made["step"]) == ("ancestral", 4, 4, "0-3", 2)
    assert made["seconds"] > 0 and made["labels"] is None
    assert "wrote 4 images" in r.output
    # a VQ run with another codebook size in the same place: one line, exit code 2
    shutil.rmtree(vq)
    make_ae_run(vq, "vq", n_codes=32)
    r = invoke(["sample-tokens", "--run", run, "--outdir", tmp_path / "o2"], expect=2)
    assert "has 32 codes but this token model has K = 16" in r.output and "Traceback" not in r.output
    # bad options are one line too
    r = invoke(["train-tokens", "--run", tmp_path / "none"], expect=2)
    assert "needs --preset" in r.output


def test_class_conditional_tokens_with_guidance(tmp_path):
    vq = make_ae_run(tmp_path / "vq", "vq")
    run = tmp_path / "tok"
    args = ["train-tokens", "--preset", "fashion-vq-tokens", "--run", run, "--no-progress", "--threads", "1",
            "--set", f"vq_run={vq}", "--set", "cond.label.kind=class", "--set", "sample.guidance_scale=2.0"]
    for s in TINY_TOKENS:
        args += ["--set", s]
    invoke(args)
    assert "num_classes: 10" in (run / "config.yaml").read_text()  # the class conditioner's, from MNIST
    out = tmp_path / "out"
    invoke(["sample-tokens", "--run", run, "--seeds", "0-2", "--outdir", out, "--guidance-scale", "3"])
    assert len(list(out.glob("00000*.png"))) == 3
    # an unconditional run refuses a guidance scale in one line
    r = invoke(["train-tokens", "--preset", "fashion-vq-tokens", "--run", tmp_path / "u", "--set", f"vq_run={vq}",
                "--set", "sample.guidance_scale=2.0", *sum((["--set", s] for s in TINY_TOKENS), [])], expect=2)
    assert "takes no conditions" in r.output
