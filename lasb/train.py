"""The training steps and loop, written once.

Ray Train workers (jobs/train.py), benchmarks and tests all call `train_models` with an iterator
of batches {"x0": uint8 (B,H,W,3), "x1": uint8 (B,H,W,3), "mask": (B,H,W)}: stage 1 fits the
codec, then the latent scale is measured, then stage 2 fits the bridge denoiser.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from lasb import bridge
from lasb.codec import Codec, build_codec, load_codec, measure_scale
from lasb.config import Config, dump_yaml
from lasb.denoiser import Denoiser, build_denoiser, load_denoiser
from lasb.features import build_backbone, perceptual_loss

log = logging.getLogger(__name__)

Report = Callable[[dict], None]


def resolve_device(name: str = "auto") -> torch.device:
    """GPU when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B,H,W,3) -> float (B,3,H,W) in [-1, 1] on device."""
    x = torch.as_tensor(images).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def schedule_for(cfg: Config) -> bridge.Schedule:
    b = cfg.bridge
    return bridge.make_schedule(bridge.make_betas(b.schedule, b.n_steps, b.beta_max))


@dataclass
class TrainedModels:
    codec: Codec
    denoiser: Denoiser  # EMA weights
    history: list[dict]


class EMA:
    """Exponential moving average of a module's parameters (the sampler uses the EMA copy)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        # warm-up (1+t)/(10+t): without it, 0.999^800 = 45% of the random init would remain
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.shadow.parameters(), module.parameters()):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(self.shadow.buffers(), module.buffers()):
            e.copy_(b)


def _optimize(loss: torch.Tensor, opt: torch.optim.Optimizer, params, scaler) -> None:
    """backward + clip + step, through the GradScaler (a no-op pass-through when disabled)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scaler.step(opt)
    scaler.update()


def _autocast(x: torch.Tensor, amp: bool):
    return torch.autocast(x.device.type, dtype=torch.float16, enabled=amp)


_NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


def codec_step(codec: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, cfg: Config,
               perceptual=None, scaler=_NO_SCALER) -> dict:
    """One stage-1 step: reconstruction (+ feature) loss + KL / VQ commitment."""
    with _autocast(x, scaler.is_enabled()):
        loss, logs = codec(x, perceptual, cfg.codec.perceptual_weight, cfg.codec.kl_weight)
    _optimize(loss, opt, codec.parameters(), scaler)
    return {"loss": float(loss.detach()), **logs}


def bridge_step(denoiser: nn.Module, opt: torch.optim.Optimizer, sched: bridge.Schedule,
                z0: torch.Tensor, z1: torch.Tensor, cfg: Config,
                generator: torch.Generator | None = None, scaler=_NO_SCALER,
                n: torch.Tensor | None = None) -> dict:
    """One stage-2 step: n ~ U{0..N-1} (unless given), x_n ~ q(x_n|x0,x1), MSE on
    (x_n - x0)/sigma_n."""
    if n is None:
        n = torch.randint(0, sched.n_steps, (z0.shape[0],), generator=generator)
    n = n.to(z0.device)
    ot_ode = cfg.bridge.sampler == "ot_ode"
    x_n = bridge.q_sample(sched, n, z0, z1, ot_ode=ot_ode)
    target = bridge.training_target(sched, n, x_n, z0)
    with _autocast(z0, scaler.is_enabled()):
        pred = denoiser(x_n, n, z1)
    loss = F.mse_loss(pred.float(), target)
    _optimize(loss, opt, denoiser.parameters(), scaler)
    return {"loss": float(loss.detach())}


def _warmup(opt: torch.optim.Optimizer, steps: int = 100):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / steps))


def _all_reduce_mean(value: float, device: torch.device) -> float:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([value], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t) / torch.distributed.get_world_size()
    return value


def _optimization_state(opt, sched_lr, scaler) -> dict:
    """What a stage needs besides its weights to continue exactly: optimizer, LR schedule,
    GradScaler and the global torch RNG (q_sample noise, VAE sampling)."""
    return {"opt": opt.state_dict(), "lr": sched_lr.state_dict(),
            "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state()}


def _restore_optimization(state: dict, opt, sched_lr, scaler) -> None:
    opt.load_state_dict(state["opt"])
    sched_lr.load_state_dict(state["lr"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])


# (stage, step, build_state): the callee decides whether to build and store the state (under
# DDP only rank 0 does; every rank must still call ray.train.report)
SaveCheckpoint = Callable[[str, int, Callable[[], dict]], None]


def train_models(
    cfg: Config,
    batches: Iterator[dict],
    device: torch.device | None = None,
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    report: Report | None = None,
    probe: Callable[[Codec, Denoiser, int], dict] | None = None,
    checkpoint: SaveCheckpoint | None = None,
    resume: dict | None = None,
) -> TrainedModels:
    """Stage 1 (codec) then stage 2 (bridge) on one stream of batches.

    `wrap` is identity in-process and `ray.train.torch.prepare_model` under Ray Train (DDP);
    `report` receives progress dicts every `train.log_every` steps. `probe(codec, ema_denoiser,
    step)`, if given, is called at each stage-2 progress point and its dict joins the entry
    (lasb tune evaluates pseudo-validation there); its time is not counted in sec_per_step.
    `checkpoint` is called every `train.checkpoint_every` steps of either stage; `resume`, a
    state it produced, continues from that step with models, EMA, optimizers, LR schedules,
    GradScaler and RNG restored.
    """
    device = device or resolve_device()
    torch.manual_seed(cfg.train.seed)
    state = resume or {}
    resumed = state.get("stage")
    history: list[dict] = list(state.get("history", []))
    amp = cfg.train.mixed_precision and device.type == "cuda"

    def emit(entry: dict) -> None:
        history.append(entry)
        log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in entry.items()))
        if report is not None:
            report(entry)

    def next_batch() -> dict:
        try:
            return next(batches)
        except StopIteration:
            raise RuntimeError("the training stream ended before all steps ran") from None

    def due(step: int, last: int) -> bool:
        every = cfg.train.checkpoint_every
        return checkpoint is not None and every > 0 and step % every == 0 and step < last

    if resumed:
        emit({"stage": "resume", "from_stage": resumed, "from_step": state["step"]})

    # ---- stage 1: codec -------------------------------------------------------------------
    if cfg.codec.pretrained:
        codec = load_codec(cfg.codec.pretrained, cfg.codec.kind).to(device)
        codec_steps = 0
    else:
        codec = build_codec(cfg.codec).to(device)
        codec_steps = cfg.codec.steps
    if resumed:
        codec.model.load_state_dict(state["codec"])
    first = state["step"] + 1 if resumed == "codec" else 1
    if resumed == "bridge":
        first = codec_steps + 1
    perceptual = None
    if first <= codec_steps and cfg.codec.perceptual_weight > 0 and cfg.score.backbone != "pixel":
        backbone = build_backbone(cfg.score.backbone, cfg.score.layers, cfg.data.image_size)
        perceptual = perceptual_loss(backbone.to(device))
    train_codec = wrap(codec) if first <= codec_steps else codec
    opt = torch.optim.AdamW(train_codec.parameters(), lr=cfg.codec.lr, weight_decay=0.0)
    sched_lr = _warmup(opt)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    if resumed == "codec":
        _restore_optimization(state, opt, sched_lr, scaler)
    t0 = time.perf_counter()
    for step in range(first, codec_steps + 1):
        b = next_batch()
        # x1 mixes normal and defective images: the bridge needs both encoded faithfully
        x = to_model_input(b["x1"], device)
        logs = codec_step(train_codec, opt, x, cfg, perceptual, scaler)
        sched_lr.step()
        if step % cfg.train.log_every == 0 or step == codec_steps:
            emit({"stage": "codec", "step": step, **logs,
                  "sec_per_step": (time.perf_counter() - t0) / (step - first + 1)})
        if due(step, codec_steps):
            checkpoint("codec", step, lambda step=step: {
                "stage": "codec", "step": step, "codec": codec.model.state_dict(),
                **_optimization_state(opt, sched_lr, scaler), "history": history})
    codec.eval().requires_grad_(False)

    # ---- latent scale ---------------------------------------------------------------------
    if resumed == "bridge":
        codec.set_scale(state["scale"])
    elif not cfg.codec.pretrained or codec.scale == 1.0:
        scale_batches = [to_model_input(next_batch()["x0"], device) for _ in range(2)]
        scale = _all_reduce_mean(measure_scale(codec, scale_batches), device)
        codec.set_scale(scale)
        emit({"stage": "scale", "latent_scale": scale})

    # ---- stage 2: bridge ------------------------------------------------------------------
    sched = schedule_for(cfg)
    denoiser = build_denoiser(cfg.denoiser, cfg.codec.latent_channels, cfg.latent_size).to(device)
    ema = EMA(denoiser, cfg.denoiser.ema_decay)
    train_denoiser = wrap(denoiser)
    opt = torch.optim.AdamW(train_denoiser.parameters(), lr=cfg.denoiser.lr, weight_decay=0.0)
    sched_lr = _warmup(opt)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    first = 1
    if resumed == "bridge":
        denoiser.load_state_dict(state["denoiser"])
        ema.shadow.load_state_dict(state["ema"])
        ema.updates = state["ema_updates"]
        _restore_optimization(state, opt, sched_lr, scaler)
        gen.set_state(state["gen"])
        first = state["step"] + 1
    t0 = time.perf_counter()
    running = 0.0
    for step in range(first, cfg.denoiser.steps + 1):
        b = next_batch()
        with torch.no_grad():
            z0 = codec.encode(to_model_input(b["x0"], device))
            z1 = codec.encode(to_model_input(b["x1"], device))
        logs = bridge_step(train_denoiser, opt, sched, z0, z1, cfg, gen, scaler)
        sched_lr.step()
        ema.update(denoiser)
        running += logs["loss"]
        if step % cfg.train.log_every == 0 or step == cfg.denoiser.steps:
            n = cfg.train.log_every if step % cfg.train.log_every == 0 else step % cfg.train.log_every
            entry = {"stage": "bridge", "step": step, "loss": running / n,
                     "sec_per_step": (time.perf_counter() - t0) / (step - first + 1)}
            if probe is not None:
                t_probe = time.perf_counter()
                entry.update(probe(codec, ema.shadow, step))
                t0 += time.perf_counter() - t_probe
            emit(entry)
            running = 0.0
        if due(step, cfg.denoiser.steps):
            checkpoint("bridge", step, lambda step=step: {
                "stage": "bridge", "step": step, "codec": codec.model.state_dict(),
                "scale": codec.scale, "denoiser": denoiser.state_dict(),
                "ema": ema.shadow.state_dict(), "ema_updates": ema.updates,
                **_optimization_state(opt, sched_lr, scaler), "gen": gen.get_state(),
                "history": history})
    return TrainedModels(codec=codec, denoiser=ema.shadow, history=history)


def save_models(folder: str | Path, models: TrainedModels, cfg: Config) -> Path:
    """codec/ and denoiser/ in diffusers save_pretrained layout (safetensors) + config.yaml."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    models.codec.model.save_pretrained(folder / "codec", safe_serialization=True)
    models.denoiser.unet.save_pretrained(folder / "denoiser", safe_serialization=True)
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    return folder


def load_models(folder: str | Path, cfg: Config) -> tuple[Codec, Denoiser]:
    folder = Path(folder)
    codec = load_codec(str(folder / "codec"), cfg.codec.kind)
    denoiser = load_denoiser(str(folder / "denoiser"), cfg.denoiser.cond_x1)
    return codec.eval().requires_grad_(False), denoiser.eval().requires_grad_(False)
