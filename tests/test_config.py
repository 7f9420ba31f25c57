"""Config: presets, YAML round trip, overrides, and errors that name the bad key."""

import pytest

from lasb.config import ConfigError, config_from_yaml, dump_yaml, load_config, parse_override


@pytest.mark.parametrize("preset", ["tiny", "cpu", "paper"])
def test_presets_validate_and_round_trip_through_yaml(preset):
    cfg = load_config(preset)
    assert config_from_yaml(dump_yaml(cfg)) == cfg


def test_paper_preset_has_the_papers_sizes():
    cfg = load_config("paper")
    assert cfg.data.image_size == 256 and cfg.latent_size == 64
    assert cfg.codec.kind == "vq" and cfg.codec.latent_channels == 3
    assert cfg.bridge.n_steps == 1000 and cfg.bridge.nfe == 10


def test_overrides_apply_with_yaml_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bridge:\n  beta_max: 1.0\n  sampler: ot_ode\n")
    cfg = load_config("tiny", path, ["bridge.nfe=4", "denoiser.block_out_channels=[32,32]"])
    assert cfg.bridge.beta_max == 1.0 and cfg.bridge.sampler == "ot_ode"
    assert cfg.bridge.nfe == 4 and cfg.denoiser.block_out_channels == (32, 32)
    assert parse_override("a.b.c=x") == {"a": {"b": {"c": "x"}}}


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("bridge.nfee=4", "bridge.nfee"),
        ("bridge.nfe=many", "bridge.nfe"),
        ("bridge.sampler=euler", "bridge.sampler"),
        ("bridge.nfe=5000", "bridge.nfe"),
        ("data.image_size=100", "data.image_size"),
        ("denoiser.block_out_channels=[30,60]", "block_out_channels"),
        ("train.workers=true", "train.workers"),
    ],
)
def test_bad_values_raise_errors_naming_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config("tiny", overrides=[override])


def test_unknown_preset_and_missing_file_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")
    with pytest.raises(ConfigError, match="not found"):
        load_config("tiny", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("bridge: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("tiny", bad)
