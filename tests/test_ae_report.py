"""`eval recon` (a first stage's held-out reconstruction metrics, rFID/rKID) and the report of a `train-ae` run."""
from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from latent_runs import make_ae_run
from torchdiffusion.cli.main import cli
from torchdiffusion.config.first_stage import load_first_stage, reconstruction_metrics


class _PixelFeatures:
    """A stand-in feature network (mean pixel rows): rFID is computed on whatever features it is given."""
    name = "pixel-rows"

    def __call__(self, x_u8):
        return x_u8.float().mean(dim=(1, 3)).double().numpy()


def _invoke(args, expect=0):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == expect, r.output
    return r


def test_eval_recon_writes_what_the_report_shows(tmp_path):
    data = {"kind": "mnist", "split": "train", "val_split": "val", "limit": 64, "resolution": 32}
    for kind in ("kl", "vq"):
        run = make_ae_run(tmp_path / kind, kind, data=data)
        r = _invoke(["eval", "recon", "--run", run, "--n", "16", "--no-features", "--threads", "1", "--quiet"])
        got = json.loads(r.output.strip().splitlines()[-1])
        assert got == json.loads((run / "eval" / "recon.json").read_text())
        fs = load_first_stage(run)
        from torchdiffusion.config.build import build_data
        want = reconstruction_metrics(fs.module, build_data(fs.config.data, "val").x[:16])
        for k in ("rec_l1", "psnr", "ssim"):
            assert abs(got[k] - want[k]) < 1e-6, k
        assert got["n"] == 16 and got["split"] == "val" and got["kind"] == kind
        assert ("code_usage" in got) == (kind == "vq")
        _invoke(["report", run, "--out", tmp_path / f"rep_{kind}"])
        page = (tmp_path / f"rep_{kind}" / "index.html").read_text()
        assert "Autoencoder (first stage)" in page and "eval recon" in page
        assert f"{got['psnr']:.4g}"[:4] in page


def test_rfid_of_a_perfect_reconstruction_is_zero_and_grows_with_error():
    """rFID compares reconstructions with the originals: ~0 when they coincide, larger when they do not."""
    x = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)

    class Identity(torch.nn.Module):
        kind = "kl"

        def encode(self, x):
            class Post:
                def mode(self_inner):
                    return x
            return Post()

        def decode(self, z):
            return z

    class Blur(Identity):
        def decode(self, z):
            return torch.nn.functional.avg_pool2d(z, 3, 1, 1)

    perfect = reconstruction_metrics(Identity(), x, extractor=_PixelFeatures())
    blurred = reconstruction_metrics(Blur(), x, extractor=_PixelFeatures())
    assert abs(perfect["rfid"]) < 1e-6 and perfect["psnr"] == 100.0 and abs(perfect["ssim"] - 1) < 1e-6
    assert blurred["rfid"] > 1e-3 and blurred["psnr"] < 40


def test_eval_recon_refuses_a_missing_run_in_one_line(tmp_path):
    r = _invoke(["eval", "recon", "--run", tmp_path / "nothing"], expect=1)
    assert len(r.output.strip().splitlines()) == 1 and "no such autoencoder run" in r.output
