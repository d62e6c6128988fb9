"""Config sections chosen by `kind` (unions keyed on kind through the one registry), derived fields, and the
migration of release 0.1.0's layout."""
import pytest
import yaml

from torchdiffusion.config import registry
from torchdiffusion.config.presets_io import load_preset, preset_names, resolve
from torchdiffusion.config.schema import ModelConfig, RunConfig
from torchdiffusion.config.strict import from_dict, to_dict
from torchdiffusion.core.processes import EDM, VE, VPDiscrete
from torchdiffusion.core.vdm import VDM
from torchdiffusion.errors import ConfigError
from torchdiffusion.nn.unet import UNetConfig


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_yaml(name):
    cfg = resolve(load_preset(name), [])
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    assert resolve(yaml.safe_load(text), []) == cfg


@pytest.mark.parametrize("kind", sorted(registry.KINDS["process"]))
def test_each_process_kind_has_its_own_fields(kind):
    entry = registry.KINDS["process"][kind]
    cfg = from_dict(ModelConfig, {"process": {"kind": kind}})
    assert type(cfg.process) is entry.config
    d = to_dict(cfg)["process"]
    assert d["kind"] == kind and "schedule" not in (d if kind != "vp_discrete" else {})
    assert from_dict(ModelConfig, {"process": d}).process == cfg.process


def test_kind_errors_are_one_line_naming_what_is_valid():
    with pytest.raises(ConfigError, match=r"unknown process kind 'edn' \(did you mean 'edm'\?\); valid: vp_discrete"):
        resolve({}, ["model.process={kind: edn}"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.process.T'.*valid keys of model.process: "
                                          r"sigma_min, sigma_max"):
        resolve({}, ["model.process={kind: edm, T: 10}"])
    with pytest.raises(ConfigError, match="needs a 'kind' key; valid kinds: unet"):
        resolve({}, ["model.backbone={model_channels: 8}"])
    with pytest.raises(ConfigError, match="unknown conditioner kind 'klass'"):
        resolve({}, ["cond.label.kind=klass"])


def test_derived_fields_are_refused_in_a_run_config_but_not_in_direct_use():
    with pytest.raises(ConfigError, match="model.backbone.image_size is set from the data"):
        resolve(load_preset("mnist"), ["model.backbone.image_size=32"])
    with pytest.raises(ConfigError, match="model.backbone.num_classes is set from the conditioners"):
        resolve(load_preset("mnist"), ["model.backbone.num_classes=10"])
    assert UNetConfig(image_size=(16, 24), in_channels=3).hw == (16, 24)  # a direct user sets them
    assert "image_size" not in to_dict(resolve(load_preset("mnist"), []))["model"]["backbone"]


def test_switching_kind_takes_that_kinds_defaults():
    cfg = resolve(load_preset("mnist-iddpm"), ["model.process={kind: ve}"])
    assert cfg.model.process == VE()
    cfg = resolve(load_preset("mnist"), ["model.process={kind: vdm, gamma_min: -10.0}"])
    assert isinstance(cfg.model.process, VDM) and cfg.model.process.gamma_min == -10.0


def test_release_0_1_0_layout_and_overrides_are_migrated():
    old = {"model": {"process": {"kind": "vp_discrete", "T": 2000, "schedule": None, "beta_start": None,
                                 "sigma_min": None},
                     "unet": {"image_size": 32, "in_channels": 3, "out_channels": 3, "model_channels": 32,
                              "num_classes": 10}},
           "cond": {"kind": "class", "p_uncond": 0.2}}
    cfg = from_dict(RunConfig, old)
    assert cfg.model.process == VPDiscrete(T=2000)
    assert cfg.model.backbone == UNetConfig(model_channels=32)  # io fields are derived: dataclass defaults
    assert cfg.model.data_shape == (3, 32, 32)
    assert list(cfg.cond) == ["label"] and cfg.cond["label"].num_classes == 10 and cfg.cond["label"].p_uncond == 0.2
    # old-style overrides on today's presets
    cfg = resolve(load_preset("mnist"), ["model.unet.model_channels=8", "cond.kind=class", "cond.p_uncond=0.3"])
    assert cfg.model.backbone.model_channels == 8 and cfg.model.backbone.channel_mult == (1, 2, 2)
    assert cfg.cond["label"].p_uncond == 0.3 and isinstance(cfg.model.process, EDM)
    assert resolve(load_preset("mnist"), ["cond.kind=none"]).cond == {}
    with pytest.raises(ConfigError, match="cond.kind: 'label' is not valid; valid: none, class"):
        resolve({}, ["cond.kind=label"])
    with pytest.raises(ConfigError, match="model.unet.context_dim is now set from the conditioners"):
        resolve({}, ["model.unet.context_dim=16"])


def test_grid_kinds_resolve_through_the_registry():
    from torchdiffusion.config.build import build_sigmas
    from torchdiffusion.config.schema import SampleConfig
    from torchdiffusion.core import grids
    edm = EDM()
    assert set(registry.GRIDS) == {"karras", "loglinear", "discrete", "optimized", "uniform_t"}
    assert build_sigmas(SampleConfig(grid="karras", steps=5, rho=3.0), edm).equal(grids.karras(5, 0.002, 80.0, 3.0))
    with pytest.raises(ConfigError, match=r"unknown sample.grid 'karas' \(did you mean 'karras'\?\)"):
        build_sigmas(SampleConfig(grid="karas"), edm)
    with pytest.raises(ConfigError, match="needs a discrete-time model"):
        build_sigmas(SampleConfig(grid="discrete"), edm)
    with pytest.raises(ConfigError, match="'uniform_t' needs a process with a time variable"):  # not an AttributeError
        build_sigmas(SampleConfig(grid="uniform_t"), VPDiscrete())
