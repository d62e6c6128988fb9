"""The video U-Net (nn/unet3d.py): the temporal mask of joint video + image training, relative temporal positions
from real frame indices, a free frame count, and the image U-Net inside it."""
import pytest
import torch

from torchdiffusion.errors import ConfigError, TorchDiffusionError
from torchdiffusion.nn.unet import UNet
from torchdiffusion.nn.unet3d import UNet3D, UNet3DConfig, allowed_pairs, build_unet3d
from torchdiffusion.protocols import BackboneIO, CondSpec

SMALL = dict(image_size=16, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
             norm_groups=4, num_heads=2)


def _net(seed=0, **kw) -> UNet3D:
    torch.manual_seed(seed)
    net = UNet3D(UNet3DConfig(**{**SMALL, **kw}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every weight random (zero-initialised ones too), so no path is trivially dead
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net.eval()


def _x(b=2, t=6, seed=3):
    return torch.randn(b, 1, t, 16, 16, generator=torch.Generator().manual_seed(seed))


C_NOISE = torch.tensor([0.3, -0.5])


def test_perturbing_an_independent_image_changes_only_that_frame():
    net = _net()
    indep = torch.zeros(2, 6, dtype=torch.bool)
    indep[:, 4:] = True                                  # frames 4, 5: independent images
    cond = {"independent": indep}
    x = _x()
    y = net(x, C_NOISE, cond)
    for j in range(6):
        x2 = x.clone()
        x2[:, :, j] += torch.randn_like(x2[:, :, j])
        diff = (net(x2, C_NOISE, cond) - y).abs().amax(dim=(0, 1, 3, 4))
        others = [k for k in range(6) if k != j]
        if j >= 4:   # an image: no other frame moves
            assert diff[j] > 1e-3 and diff[others].max() == 0
        else:        # a video frame: the images do not move, the other video frames do (temporal attention)
            assert diff[4:].max() == 0 and diff[[k for k in range(4) if k != j]].min() > 1e-4


def test_without_the_mask_images_mix_with_the_clip():
    net = _net()
    x = _x()
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    diff = (net(x2, C_NOISE) - net(x, C_NOISE)).abs().amax(dim=(0, 1, 3, 4))
    assert diff[4:].min() > 1e-4                          # the same frames, unmasked: they see frame 0


def test_fully_masked_batches_have_no_nan_and_are_the_per_frame_net():
    net = _net()
    x = _x()
    all_images = {"independent": torch.ones(2, 6, dtype=torch.bool)}
    y = net(x, C_NOISE, all_images)
    assert torch.isfinite(y).all()
    # each frame alone (a 1-frame clip) gives the same output: an image attends only to itself
    for j in (0, 3):
        torch.testing.assert_close(net(x[:, :, j:j + 1], C_NOISE)[:, :, 0], y[:, :, j], atol=1e-5, rtol=1e-5)
    pairs = allowed_pairs(torch.tensor([[False, True, False]]))
    assert pairs[0].tolist() == [[True, False, True], [False, True, False], [True, False, True]]


def test_without_temporal_layers_permuting_frames_permutes_outputs():
    net = _net(temporal_attention=False)
    x = _x()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(net(x[:, :, perm], C_NOISE), net(x, C_NOISE)[:, :, perm], atol=1e-5, rtol=1e-5)
    assert len(net.temporal) == 0


def test_permuting_frames_with_their_indices_permutes_outputs():
    net = _net()
    x, fi = _x(), torch.arange(6.0).expand(2, 6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    y = net(x, C_NOISE, {"frame_index": fi})
    torch.testing.assert_close(net(x[:, :, perm], C_NOISE, {"frame_index": fi[:, perm]}), y[:, :, perm],
                               atol=1e-5, rtol=1e-5)
    # ... but permuting the frames alone (indices 0..T-1 kept) is a different clip: relative positions matter
    assert (net(x[:, :, perm], C_NOISE) - y[:, :, perm]).abs().max() > 1e-3


def test_temporal_positions_are_the_given_frame_indices():
    net = _net()
    x = _x()
    fi = torch.tensor([[0.0, 2, 4, 6, 8, 10], [5.0, 6, 7, 8, 9, 10]])
    y = net(x, C_NOISE, {"frame_index": fi})
    torch.testing.assert_close(net(x, C_NOISE, {"frame_index": fi + 17.0}), y, atol=1e-5, rtol=1e-5)  # shift
    assert (net(x, C_NOISE) - y)[0].abs().max() > 1e-3          # stride 2 differs from 0..5
    torch.testing.assert_close(net(x, C_NOISE)[1], y[1], atol=1e-5, rtol=1e-5)  # 5..10 = 0..5 shifted


def test_frame_count_is_free_at_sampling_time():
    net = _net()
    for t in (1, 6, 12):                                   # e.g. trained at 6, sampled at 2x
        y = net(_x(t=t), C_NOISE)
        assert y.shape == (2, 1, t, 16, 16) and torch.isfinite(y).all()


def test_image_weights_load_and_zero_temporal_layers_give_the_image_net_per_frame():
    torch.manual_seed(0)
    cfg = UNet3DConfig(**SMALL)
    image = UNet(cfg.image_config())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in image.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    net = UNet3D(cfg)
    assert set(net.image.state_dict()) == set(image.state_dict())       # the image state dict, unchanged names
    assert all(k.startswith(("image.", "temporal.")) for k in net.state_dict())
    net.load_image_weights(image.state_dict())
    x = _x()
    y = net(x, C_NOISE)                                  # temporal output projections start at zero
    per_frame = torch.stack([image(x[:, :, j], C_NOISE) for j in range(x.shape[2])], dim=2)
    torch.testing.assert_close(y, per_frame, atol=1e-5, rtol=1e-5)
    assert per_frame.abs().max() > 1e-2


def test_builder_and_bad_input_fail_in_one_line():
    net = build_unet3d(UNet3DConfig(**SMALL), BackboneIO((1, 8, 16, 16), 1, (CondSpec("frame_index", "frames"),
                                                                             CondSpec("independent", "frames"))))
    assert net.cfg.image_size == 16
    with pytest.raises(ConfigError, match="takes clips"):
        build_unet3d(UNet3DConfig(**SMALL), BackboneIO((1, 16, 16), 1))
    with pytest.raises(TorchDiffusionError, match=r"\(B, 1, T, H, W\)"):
        net(torch.zeros(2, 1, 16, 16), C_NOISE)
    with pytest.raises(TorchDiffusionError, match="frame_index"):
        net(_x(), C_NOISE, {"frame_index": torch.zeros(2, 5)})
    with pytest.raises(ConfigError, match="unet3d"):
        from torchdiffusion.nn.unet import UNetConfig, build_unet
        build_unet(UNetConfig(**SMALL), BackboneIO((1, 16, 16), 1, (CondSpec("frame_index", "frames"),)))
