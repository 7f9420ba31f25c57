"""Codec and denoiser: save/load round trips, latent scale, and steps that learn."""

import numpy as np
import pytest
import torch

from lasb.codec import build_codec, load_codec, measure_scale
from lasb.config import load_config
from lasb.denoiser import build_denoiser, load_denoiser
from lasb.pairs import iterate_pairs, make_pairs
from lasb.train import bridge_step, codec_step, schedule_for


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_codec_round_trips_with_its_measured_scale(kind, tmp_path):
    cfg = load_config("tiny", overrides=[f"codec.kind={kind}"])
    codec = build_codec(cfg.codec).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    raw_std = codec.encode_raw(x).std().item()
    scale = measure_scale(codec, [x])
    assert scale == pytest.approx(1 / raw_std, rel=1e-4)
    codec.set_scale(scale)
    assert codec.encode(x).std().item() == pytest.approx(1.0, rel=1e-4)  # unit-scale latents
    codec.model.save_pretrained(tmp_path / "codec")
    again = load_codec(str(tmp_path / "codec"), kind).eval()
    assert again.scale == pytest.approx(scale)
    with torch.no_grad():
        torch.testing.assert_close(again.decode(again.encode(x)), codec.decode(codec.encode(x)))


def test_codec_latent_has_factor_four_in_the_paper_preset():
    cfg = load_config("paper")
    assert cfg.latent_size == cfg.data.image_size // 4


def test_denoiser_round_trip_and_x1_conditioning(tmp_path):
    cfg = load_config("tiny", overrides=["denoiser.cond_x1=true"])
    net = build_denoiser(cfg.denoiser, 4, cfg.latent_size).eval()
    assert net.unet.config.in_channels == 8  # x_n and x1 stacked
    z = torch.randn(2, 4, cfg.latent_size, cfg.latent_size)
    n = torch.tensor([3, 50])
    net.unet.save_pretrained(tmp_path / "d")
    again = load_denoiser(str(tmp_path / "d"), cond_x1=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(z, n, z), net(z, n, z))


def test_training_steps_reduce_their_losses_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = load_config("tiny")
    rng = np.random.default_rng(0)
    images = (rng.random((8, 32, 32, 3)) * 60 + 90).astype(np.uint8)
    batch = next(iterate_pairs(images, 8, 8, cfg.augment, seed=0))
    x = batch["x1"].permute(0, 3, 1, 2).float() / 127.5 - 1
    codec = build_codec(cfg.codec)
    opt = torch.optim.AdamW(codec.parameters(), lr=2e-3)
    first = codec_step(codec, opt, x, cfg)["l1"]
    for _ in range(30):
        last = codec_step(codec, opt, x, cfg)["l1"]
    assert last < 0.7 * first

    sched = schedule_for(cfg)
    net = build_denoiser(cfg.denoiser, 4, cfg.latent_size)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    z0, z1 = torch.randn(8, 4, 16, 16), torch.randn(8, 4, 16, 16)
    gen = torch.Generator().manual_seed(0)
    losses = [bridge_step(net, opt, sched, z0, z1, cfg, gen)["loss"] for _ in range(60)]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_training_stream_is_the_same_however_it_is_split():
    cfg = load_config("tiny")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    whole = make_pairs({"id": np.arange(12)}, images, cfg.augment, seed=3)
    parts = [make_pairs({"id": np.arange(lo, lo + 4)}, images, cfg.augment, seed=3)
             for lo in (0, 4, 8)]
    for key in ("x0", "x1", "mask"):
        np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
    # each epoch of 5 rows shows every image exactly once, in a seeded order
    epoch0 = whole["x0"][:5].reshape(5, -1)
    assert sorted(map(bytes, epoch0)) == sorted(map(bytes, images.reshape(5, -1)))


def test_ema_warm_up_forgets_the_random_initialisation():
    from lasb.train import EMA

    net = torch.nn.Linear(4, 4)
    ema = EMA(net, decay=0.999)
    with torch.no_grad():
        net.weight.add_(1.0)  # the trained weights move away from the initialisation
    for _ in range(200):
        ema.update(net)
    # plain 0.999 decay would still hold 0.999**200 = 82% of the initial weights
    torch.testing.assert_close(ema.shadow.weight, net.weight, atol=0.06, rtol=0)
