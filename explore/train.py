"""Train the built-in model family: python -m explore.train {base,classifier,upsampler,evaluator} ...

Runs are resumable: the state (weights, EMA, optimizer, step) is written
atomically to <run_dir>/state.pt every few minutes and on exit, and the data
stream is a function of (seed, step), so a resumed run sees exactly the batches
an uninterrupted one would. `--export` writes the EMA weights as a
self-describing safetensors checkpoint for the zoo.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from explore.denoisers import upsampled
from explore.models.adm import EncoderUNetModel, UNetModel
from explore.models.configs import ClassifierConfig, DiffusionConfig, UNetConfig
from explore.models.evaluator import EvalClassifier, EvalClassifierConfig
from explore.schedules import Schedule


# --- model families ---------------------------------------------------------------------------

def base_config(num_classes: int, size: int = 32) -> UNetConfig:
    """Built-in base: ~3M parameters, attention only at 8x8, one extra label row for the null class."""
    return UNetConfig(image_size=size, model_channels=32, out_channels=3, num_res_blocks=1,
                      attention_ds=(4,), channel_mult=(1, 2, 4), num_classes=num_classes + 1,
                      num_head_channels=32)


def classifier_config(num_classes: int, size: int = 32) -> ClassifierConfig:
    """Noisy classifier for guidance: time-conditioned encoder with attention pooling, its logits gated by the
    base's signal level sqrt(abar_t) (see EncoderUNetModel)."""
    return ClassifierConfig(image_size=size, model_channels=32, out_channels=num_classes, num_res_blocks=1,
                            attention_ds=(4,), channel_mult=(1, 2, 2), num_head_channels=32,
                            signal_gate=DIFFUSION.noise_schedule, signal_gate_steps=DIFFUSION.steps)


def upsampler_config(num_classes: int, large_size: int = 128) -> UNetConfig:
    """32 -> 128 class-conditional super-resolution UNet: small and attention-free (convolutional)."""
    return UNetConfig(image_size=large_size, model_channels=32, out_channels=3, num_res_blocks=1,
                      attention_ds=(), channel_mult=(1, 2, 2), num_classes=num_classes + 1,
                      super_res=True)


DIFFUSION = DiffusionConfig(steps=1000, noise_schedule="cosine", learn_sigma=False, sigma_small=True,
                            timestep_respacing="100")
UPSAMPLER_DIFFUSION = DiffusionConfig(steps=1000, noise_schedule="linear", learn_sigma=False,
                                      timestep_respacing="50")


def diffusion_config(kind: str, prediction: str = "v", low_res_skip: bool = True) -> DiffusionConfig:
    """The process a model of `kind` is trained for (classifiers: the base's, whose x_t they see)."""
    diffusion = UPSAMPLER_DIFFUSION if kind == "upsampler" else DIFFUSION
    predict_v = prediction == "v" and kind in ("base", "upsampler")
    return replace(diffusion, predict_v=predict_v, low_res_skip=predict_v and kind == "upsampler" and low_res_skip)


# --- data -------------------------------------------------------------------------------------

class Data:
    """Batches as a function of (seed, step): procedural scenes or an image folder."""

    def __init__(self, source: str, seed: int, size: int = 32):
        self.source, self.seed, self.size, self.hires = source, seed, size, None
        if source == "scenes":
            from explore.data import scenes
            self.scenes, self.folder = scenes, None
            self.class_names = list(scenes.CLASS_NAMES)
        else:
            from explore.data.folder import ImageFolderData
            self.scenes, self.folder = None, ImageFolderData(source, size)
            self.class_names = list(self.folder.class_names)

    def _rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, step])

    def images(self, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] NCHW and int64 labels."""
        rng = self._rng(step)
        if self.folder is not None:
            return self.folder.sample(rng, batch)
        labels = rng.integers(len(self.class_names), size=batch)
        params = self.scenes.sample_params(rng, labels)
        x = self.scenes.to_model_space(self.scenes.render(params, self.size))
        flip = torch.from_numpy(rng.random(batch) < 0.5)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, torch.from_numpy(labels).long()

    def pairs(self, step: int, batch: int, crop: int, scale: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Aligned high-res crops (crop px) and low-res crops (crop/scale px) of the same scenes, and labels."""
        rng, small = self._rng(step), crop // scale
        if self.folder is not None:  # images loaded at size * scale; low-res = area downscale
            if self.hires is None:
                from explore.data.folder import ImageFolderData
                self.hires = ImageFolderData(self.source, self.size * scale)
            hr, labels = self.hires.sample(rng, batch)
            r, c = rng.integers(0, self.size - small + 1, size=2) * scale
            hr = hr[:, :, r:r + crop, c:c + crop]
            return hr, F.avg_pool2d(hr, scale), labels
        labels = rng.integers(len(self.class_names), size=batch)
        params = self.scenes.sample_params(rng, labels)
        i, j = (rng.integers(0, self.size - small + 1, size=batch) for _ in range(2))
        low = self.scenes.render_region(params, self.size, i, j, small, small)
        high = self.scenes.render_region(params, self.size * scale, i * scale, j * scale, crop, crop)
        return (self.scenes.to_model_space(high), self.scenes.to_model_space(low),
                torch.from_numpy(labels).long())


# --- training ---------------------------------------------------------------------------------

@dataclass
class TrainSpec:
    kind: str  # base | classifier | upsampler | evaluator
    run_dir: Path
    data: str = "scenes"
    seed: int = 0
    batch: int = 32
    lr: float = 2e-4
    steps: int = 20000  # total optimisation steps of the run
    minutes: float = 0.0  # stop (and save) after this many minutes of this invocation; 0 = no limit
    ema: float = 0.999
    label_dropout: float = 0.1  # base/upsampler: fraction of labels replaced by the null class (for CFG)
    save_every_s: float = 180.0
    bf16: bool = True  # bf16 autocast on CPU (CUDA uses it too when available)
    crop: int = 32  # upsampler: high-res crop size
    threads: int = 0
    prediction: str = "v"  # base/upsampler network output: "v" (Salimans & Ho 2022) or "eps" (as ADM)
    low_res_skip: bool = True  # upsampler with v: predict the residual over a bicubic upsampling of the input
    init_from: Path | None = None  # a new run starts from this run's weights (e.g. runs/base/state.pt)


def build(kind: str, num_classes: int):
    if kind == "base":
        cfg = base_config(num_classes)
        return UNetModel(cfg), cfg
    if kind == "classifier":
        cfg = classifier_config(num_classes)
        return EncoderUNetModel(cfg), cfg
    if kind == "upsampler":
        cfg = upsampler_config(num_classes)
        return UNetModel(cfg), cfg
    if kind == "evaluator":
        cfg = EvalClassifierConfig(num_classes=num_classes)
        return EvalClassifier(cfg), cfg
    raise ValueError(f"unknown model kind {kind!r}")


class Trainer:
    def __init__(self, spec: TrainSpec, device: torch.device | None = None):
        self.spec = spec
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.data = Data(spec.data, spec.seed)
        with torch.random.fork_rng(devices=[]):  # initial weights are a function of the seed, like the data
            torch.manual_seed(spec.seed)
            self.model, self.config = build(spec.kind, len(self.data.class_names))
        self.model.to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec.lr, weight_decay=0.0)
        self.step = 0
        self.seconds = 0.0
        self.earlier: list[dict] = []  # runs these weights were initialised from (steps, minutes, prediction)
        if spec.prediction not in ("v", "eps"):
            raise ValueError(f"prediction must be 'v' or 'eps', got {spec.prediction!r}")
        self.diffusion = diffusion_config(spec.kind, spec.prediction, spec.low_res_skip)
        schedule = Schedule.named(self.diffusion.noise_schedule, self.diffusion.steps)
        self.sqrt_abar = torch.from_numpy(schedule.sqrt_alphas_cumprod).float().to(self.device)
        self.sqrt_1m_abar = torch.from_numpy(schedule.sqrt_one_minus_alphas_cumprod).float().to(self.device)
        self.state_path = spec.run_dir / "state.pt"
        if self.state_path.exists():
            self._load()
        elif spec.init_from is not None:
            self._init_from(spec.init_from)

    # state ---------------------------------------------------------------------------------
    def _load(self) -> None:
        state = torch.load(self.state_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        self.earlier = json.loads(state.get("earlier", "[]"))
        recorded = state.get("prediction", "eps")
        if state.get("low_res_skip", False) != self.diffusion.low_res_skip:
            raise ValueError(f"{self.state_path} was trained with low_res_skip={state.get('low_res_skip', False)}; "
                             f"start a new --run_dir with --init_from {self.state_path} to change it")
        if self.spec.kind in ("base", "upsampler") and recorded != self.spec.prediction:
            raise ValueError(f"{self.state_path} was trained with --prediction {recorded}; resume it with the same, "
                             f"or start a new --run_dir with --init_from {self.state_path}")

    def _init_from(self, path: Path) -> None:
        """Start this run from another run's weights (model and EMA; fresh optimiser, step 0)."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.earlier = json.loads(state.get("earlier", "[]")) + [{
            "run": str(path), "steps": int(state["step"]), "minutes": round(float(state["seconds"]) / 60, 1),
            "prediction": state.get("prediction", "eps"), "batch": state.get("batch")}]

    def save(self) -> None:
        self.spec.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                    "step": self.step, "seconds": self.seconds, "prediction": self.spec.prediction,
                    "low_res_skip": self.diffusion.low_res_skip, "batch": self.spec.batch,
                    "earlier": json.dumps(self.earlier)}, tmp)
        os.replace(tmp, self.state_path)
        (self.spec.run_dir / "progress.json").write_text(json.dumps(
            {"kind": self.spec.kind, "step": self.step, "minutes": round(self.seconds / 60, 1)}))

    # losses --------------------------------------------------------------------------------
    def _null_dropout(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        drop = torch.rand(labels.shape, generator=generator) < self.spec.label_dropout
        return torch.where(drop, torch.full_like(labels, len(self.data.class_names)), labels)

    def loss(self, step: int) -> torch.Tensor:
        spec = self.spec
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + step)
        if spec.kind == "upsampler":
            x0, low_res, labels = self.data.pairs(step, spec.batch, spec.crop, 4)
        else:
            x0, labels = self.data.images(step, spec.batch)
        t = torch.randint(0, self.diffusion.steps, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, labels, t, noise = (v.to(self.device) for v in (x0, labels, t, noise))
        if spec.kind == "evaluator":
            return F.cross_entropy(self.model(x0), labels)
        x_t = self.sqrt_abar[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m_abar[t].view(-1, 1, 1, 1) * noise
        if spec.kind == "classifier":
            return F.cross_entropy(self.model(x_t, t).float(), labels)
        labels = self._null_dropout(labels.cpu(), gen).to(self.device)
        kwargs = {"low_res": low_res.to(self.device)} if spec.kind == "upsampler" else {}
        out = self.model(x_t, t, y=labels, **kwargs).float()
        if spec.prediction == "v":
            clean = x0 - upsampled(kwargs["low_res"], x0.shape[-2:]) if self.diffusion.low_res_skip else x0
            target = self.sqrt_abar[t].view(-1, 1, 1, 1) * noise - self.sqrt_1m_abar[t].view(-1, 1, 1, 1) * clean
        else:
            target = noise
        return F.mse_loss(out, target)

    def train(self) -> None:
        spec = self.spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        stop = {"now": False}
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        started, last_save = time.time(), time.time()
        use_bf16 = spec.bf16 and self.device.type in ("cpu", "cuda")
        bar = tqdm(total=spec.steps, initial=self.step, desc=f"train {spec.kind}", unit="step", dynamic_ncols=True)
        try:
            while self.step < spec.steps and not stop["now"]:
                tick = time.time()
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = self.loss(self.step)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                for group in self.opt.param_groups:  # linear warm-up
                    group["lr"] = spec.lr * min(1.0, (self.step + 1) / 500)
                self.opt.step()
                self._update_ema()
                self.step += 1
                self.seconds += time.time() - tick
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if time.time() - last_save > spec.save_every_s:
                    self.save()
                    last_save = time.time()
                if spec.minutes and time.time() - started > spec.minutes * 60:
                    break
        finally:
            bar.close()
            self.save()
            signal.signal(signal.SIGTERM, previous)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.spec.ema, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p.detach(), 1 - decay)

    def export(self, path: Path) -> Path:
        """EMA weights + a JSON that describes them, loadable by explore.zoo."""
        from explore.zoo import save_checkpoint
        kind = {"base": "diffusion", "upsampler": "superres", "classifier": "classifier",
                "evaluator": "evaluator"}[self.spec.kind]
        stages = self.earlier + [{"run": str(self.spec.run_dir), "steps": self.step, "minutes": round(self.seconds / 60, 1),
                                  "prediction": self.spec.prediction, "batch": self.spec.batch}]
        steps = sum(stage["steps"] for stage in stages)
        minutes = sum(stage["minutes"] for stage in stages)
        images_seen = sum(stage["steps"] * (stage.get("batch") or self.spec.batch) for stage in stages)
        meta = {
            "kind": kind,
            "model_config": self.config.to_dict(),
            "class_names": self.data.class_names,
            "training": {"steps": steps, "batch_size": self.spec.batch, "images_seen": images_seen,
                         "cpu_minutes": round(minutes, 1), "data": self.spec.data, "seed": self.spec.seed,
                         "ema": self.spec.ema, "label_dropout": self.spec.label_dropout
                         if kind in ("diffusion", "superres") else 0.0,
                         "stages": stages},
        }
        if kind in ("diffusion", "superres"):
            meta["diffusion_config"] = self.diffusion.to_dict()
            meta["null_class"] = len(self.data.class_names)
        if kind == "superres":
            meta["small_size"] = self.config.image_size // 4
        if kind == "classifier":
            meta["diffusion_config"] = self.diffusion.to_dict()
        return save_checkpoint(self.ema, path, meta)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m explore.train", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["base", "classifier", "upsampler", "evaluator"])
    parser.add_argument("--run_dir", type=Path, help="where the resumable state lives (default runs/<kind>)")
    parser.add_argument("--data", default="scenes", help="'scenes' (procedural renderer) or an image folder "
                        "with one sub-folder per class")
    for field in ["seed", "batch", "steps", "crop"]:
        parser.add_argument(f"--{field}", type=int, default=TrainSpec.__dataclass_fields__[field].default)
    for field in ["lr", "minutes", "ema", "label_dropout"]:
        parser.add_argument(f"--{field}", type=float, default=TrainSpec.__dataclass_fields__[field].default)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--prediction", choices=["v", "eps"], default="v",
                        help="diffusion models: predict v (default) or eps")
    parser.add_argument("--no_low_res_skip", action="store_true",
                        help="upsampler: predict the image itself, not its residual over bicubic upsampling")
    parser.add_argument("--init_from", type=Path, help="start a new run from another run's state.pt (weights only)")
    parser.add_argument("--no_bf16", action="store_true", help="train in fp32")
    parser.add_argument("--export", type=Path, help="write the EMA weights to this .safetensors file when done")
    parser.add_argument("--export_only", action="store_true", help="export the run's current state without training")
    args = parser.parse_args(argv)
    spec = TrainSpec(kind=args.kind, run_dir=args.run_dir or Path("runs") / args.kind, data=args.data,
                     seed=args.seed, batch=args.batch, crop=args.crop, lr=args.lr, steps=args.steps, minutes=args.minutes,
                     ema=args.ema, label_dropout=args.label_dropout, bf16=not args.no_bf16, threads=args.threads,
                     prediction=args.prediction, init_from=args.init_from, low_res_skip=not args.no_low_res_skip)
    trainer = Trainer(spec)
    if args.export_only:
        if not args.export:
            parser.error("--export_only needs --export PATH")
        print("exported", trainer.export(args.export), "at step", trainer.step)
        return
    print(f"{spec.kind}: {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M parameters, "
          f"resuming at step {trainer.step}" if trainer.step else
          f"{spec.kind}: {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M parameters, new run")
    trainer.train()
    if args.export:
        print("exported", trainer.export(args.export))


if __name__ == "__main__":
    main()
