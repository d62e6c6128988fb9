"""Video data: Moving MNIST generated deterministically, joint batches with independent images, clip folders with
their bad-file policy, and the frames conditioner."""
import numpy as np
import pytest
import torch
from PIL import Image

from torchdiffusion.conditioners.frames import FramesConditioner, FramesConditionerConfig
from torchdiffusion.data.moving_mnist import load_moving_mnist
from torchdiffusion.data.video_dataset import VideoArrayDataset, image_sources_for
from torchdiffusion.data.video_folder import load_video_folder
from torchdiffusion.errors import ConfigError, DataError


def _mm(**kw):
    return load_moving_mnist(**{"split": "test", "resolution": 32, "frames": 6, "clips": 12, **kw})


def test_moving_mnist_is_deterministic_and_bounces_inside_the_canvas():
    a, b = _mm(), _mm()
    assert a.x.shape == (12, 1, 6, 32, 32) and a.x.dtype == torch.uint8
    assert torch.equal(a.x, b.x) and torch.equal(a.extras["digits"], b.extras["digits"])
    assert torch.equal(_mm(clips=5).x, a.x[:5])              # clips only truncates: a fixed test set
    assert not torch.equal(_mm(split="train").x, a.x)        # other split, other digits
    assert not torch.equal(_mm(generation_seed=1).x, a.x)
    # each frame holds the digits' ink (never clipped away) and the frames differ (the digits move)
    ink = a.x.flatten(3).float().sum(-1)[:, 0]               # (N, T)
    assert (ink > 0).all() and (a.x[:, :, 1:] != a.x[:, :, :-1]).any()
    s = load_moving_mnist("test", resolution=32, frames=4, frame_stride=3, clips=2)
    assert s.frame_index[0].tolist() == [0.0, 3.0, 6.0, 9.0]
    long = load_moving_mnist("test", resolution=32, frames=10, clips=2)
    assert torch.equal(s.x, long.x[:, :, ::3])               # stride = every 3rd frame of the same trajectory


def test_moving_mnist_bad_options_are_one_line():
    for kw, match in (({"digits": 0}, "digits"), ({"speed": -1.0}, "speed"), ({"digit_size": 40}, "digit_size"),
                      ({"split": "nope"}, "split"), ({"channels": "RGB"}, "gray")):
        with pytest.raises(DataError, match=match):
            _mm(**kw)


def test_joint_batches_append_independent_images_from_other_clips():
    d = _mm(image_frames=3)
    idx = torch.tensor([4, 0, 7])
    b = d.batch(idx)
    assert b["x"].shape == (3, 1, 9, 32, 32) and b["independent"][:, 6:].all() and not b["independent"][:, :6].any()
    assert torch.equal(b["x"][:, :, :6], d.x[idx])
    clip, frame = image_sources_for(idx, 3, len(d), 6)
    assert (clip != idx[:, None]).all()                      # never the row's own clip
    for r in range(3):
        for k in range(3):
            assert torch.equal(b["x"][r, :, 6 + k], d.x[clip[r, k], :, frame[r, k]])
    assert torch.equal(d.batch(idx)["x"], b["x"])            # a function of the indices: resumable
    assert d.sample_shape == (1, 6, 32, 32)
    with pytest.raises(DataError, match="image_frames"):
        VideoArrayDataset(d.x, image_frames=-1)


def test_frames_conditioner_passes_indices_and_the_mask():
    d = _mm(image_frames=2)
    b = d.batch(torch.arange(2))
    c = FramesConditioner("frames", FramesConditionerConfig())
    out = c.from_batch(b, 0)
    assert torch.equal(out["independent"], b["independent"]) and out["frame_index"].shape == (2, 8)
    assert "independent" not in FramesConditioner("frames", FramesConditionerConfig(mask=False)).from_batch(b, 0)
    assert c.for_sampling([0, 1]) == {}
    assert c.for_sampling([0, 1], [0, 2, 4])["frame_index"].tolist() == [[0, 2, 4]] * 2
    with pytest.raises(ConfigError, match="video batches"):
        c.from_batch({"x": torch.zeros(1, 1, 8, 8)}, 0)


def _gif(path, frames, size=(16, 16), sizes=None):
    ims = [Image.fromarray(np.full(sizes[i] if sizes else size, 20 * i, dtype=np.uint8)) for i in range(frames)]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=100)


def test_clip_folders_cut_clips_and_count_bad_files(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    _gif(root / "a.gif", 9)                                   # 9 frames: 2 clips of 4 at stride 1
    _gif(root / "b.gif", 3)                                   # short
    (root / "c.gif").write_bytes(b"GIF89a not really")        # undecodable
    _gif(root / "d.gif", 4, size=(12, 12))                    # a size unlike the first clip's (no resize)
    with pytest.raises(DataError) as e:
        load_video_folder(root, frames=4)
    msg = str(e.value)
    assert "\n" not in msg and "3 bad clip" in msg
    for word in ("1 short (first: b.gif", "1 undecodable (first: c.gif", "1 mixed-size (first: d.gif"):
        assert word in msg
    d = load_video_folder(root, frames=4, bad_files="skip")
    assert d.x.shape == (2, 1, 4, 16, 16) and d.info["bad"] == {"undecodable": 1, "short": 1, "mixed-size": 1}
    assert d.frame_index.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert d.x[1, 0, :, 0, 0].tolist() == [80, 100, 120, 140]  # frames 4..7 of a.gif
    s = load_video_folder(root, frames=3, frame_stride=2, bad_files="skip", resolution=8)
    assert s.x.shape == (1, 1, 3, 8, 8) and s.frame_index[0].tolist() == [0, 2, 4]  # a.gif: one clip spans 5
    assert s.info["bad"] == {"undecodable": 1, "short": 2, "mixed-size": 0}  # d.gif (4 frames) is short now
    (root / "e.mp4").write_bytes(b"\x00" * 16)
    try:
        import av  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="PyAV"):
            load_video_folder(root, frames=4, bad_files="skip")
