"""Train a variable-rate model with the thesis's target-rate loss.

    python -m lcodec.models.training.train --data ../shared/data/train --out runs/hp64 --steps 12000

One network serves every level of `--levels`; each training image gets a random
level, and each level keeps its own loss state (R_param,t, EMA, β). The run is
resumable: `--out` holds `checkpoint.pt` (rewritten atomically every
`--ckpt-minutes`), `log.jsonl` (one line per logged step and per validation)
and `curves.png`. Running the same command again continues where it stopped.

CPU, one GPU (`--amp` for bf16 autocast) or several processes under
`torchrun --nproc_per_node K -m lcodec.models.training.train ...` (DistributedDataParallel;
gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from ... import engine
from ...bitstream.container import RATE_SCALE
from ..entropy_models import SCALE_BOUND
from ..lifting import LATENT_CHANNELS, WAVELET_LEVELS
from ..networks import DEFAULT_LEVELS, MeanScaleHyperprior, ModelConfig, build_model
from .freeze import freeze
from .losses import LevelLoss, make_level_losses

VALIDATION_IMAGES = ("kodim04.png", "kodim08.png", "kodim15.png", "kodim23.png")


def load_images(folder: Path, limit: int | None = None) -> torch.Tensor:
    """All PNG/JPEG images of a folder as one uint8 tensor (n, 3, H, W); same size required."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if limit:
        files = files[:limit]
    if not files:
        raise SystemExit(f"no training images in {folder}")
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def random_batch(images: torch.Tensor, batch: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    """Random crops with random horizontal/vertical flips, as float in [0, 1]."""
    n, _, H, W = images.shape
    idx = torch.randint(n, (batch,), generator=gen)
    ys = torch.randint(H - crop + 1, (batch,), generator=gen)
    xs = torch.randint(W - crop + 1, (batch,), generator=gen)
    flips = torch.rand(batch, 2, generator=gen) < 0.5
    out = []
    for i in range(batch):
        c = images[idx[i], :, ys[i]:ys[i] + crop, xs[i]:xs[i] + crop]
        if flips[i, 0]:
            c = c.flip(2)
        if flips[i, 1]:
            c = c.flip(1)
        out.append(c)
    return torch.stack(out).float() / 255.0


def psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def validate(model: torch.nn.Module, kodak: Path, device: torch.device) -> list[dict]:
    """Per level, on a few Kodak images: the mean estimated bpp of the rounded latents and the
    mean PSNR of their reconstruction (the float model, plain rounding), and the mean bpp and
    PSNR of really coded files (the model frozen as the codec would ship it, one pass at the
    level, header included, rounded as the encoder rounds; hyperprior only)."""
    files = [kodak / f for f in VALIDATION_IMAGES if (kodak / f).exists()]
    if not files:
        return []
    images = [np.array(Image.open(f).convert("RGB")) for f in files]
    model.eval()
    coded = coded_points(model, images)
    rows = []
    for i, r in enumerate(model.config.levels):
        bpps, psnrs = [], []
        for pixels in images:
            x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float().to(device) / 255
            out = model.evaluate(x, torch.tensor([float(i)], device=device))
            bpps.append(out["bits"].item() / (x.shape[2] * x.shape[3]))
            psnrs.append(psnr(torch.mean((out["x_hat"].clamp(0, 1) - x) ** 2).item()))
        rows.append({"level": i, "target": r, "bpp_est": float(np.mean(bpps)),
                     "bpp_coded": coded[0][i] if coded else None, "psnr": float(np.mean(psnrs)),
                     "psnr_coded": coded[1][i] if coded else None})
    model.train()
    return rows


def frozen_weights(model: MeanScaleHyperprior) -> engine.Weights:
    """A copy of `model` frozen as the codec would ship it (`freeze`, through a temporary file), loaded."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frozen.pt"
        freeze(copy.deepcopy(model).cpu(), path)
        return engine.Weights.load(path)


def coded_points(model: torch.nn.Module, images: list[np.ndarray]) -> tuple[list[float], list[float]] | None:
    """Per level, the mean real bpp of one-pass .lc files and the mean PSNR of their decoded
    pixels: freeze a copy of the model and code with it."""
    if not isinstance(model, MeanScaleHyperprior):
        return None
    try:
        weights = frozen_weights(model)
    except ValueError as e:  # e.g. an h_s that integer arithmetic cannot hold exactly
        tqdm.write(f"validation: cannot freeze this model ({e}); no coded rates")
        return None
    L = len(model.config.levels)
    bpp, quality = np.zeros((len(images), L)), np.zeros((len(images), L))
    for i, pixels in enumerate(images):
        enc = engine.Encoder(weights.model, pixels, "RGB")
        for level in range(L):
            data = enc.file(level * RATE_SCALE, 0, weights.digest4)
            decoded = engine.decode_array(data, weights=weights)[0]
            bpp[i, level] = 8 * len(data) / (pixels.shape[0] * pixels.shape[1])
            quality[i, level] = psnr(float(np.mean((decoded.astype(np.float64) - pixels) ** 2)) / 255**2)
    return bpp.mean(0).tolist(), quality.mean(0).tolist()


def drop_log_after(log_path: Path, step: int) -> None:
    """Remove the log records of steps after `step`: a run stopped between two checkpoints logged
    steps that the resumed run does again, and each step should appear once in the log."""
    if not log_path.exists():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        log_path.write_text("".join(kept))


def small_copy(checkpoint: dict) -> dict:
    """The `--small-copy` form of a checkpoint: fp16 weights and no optimizer state (about a sixth of the
    size), to carry a run between machines; it resumes (Adam's moments restart from zero)."""
    small = {k: v for k, v in checkpoint.items() if k != "optimizer"}
    return small | {"model": {k: v.half() for k, v in checkpoint["model"].items()}}


def plot_curves(log_path: Path, out_png: Path) -> None:
    """Training curves beside the log: loss, PSNR, R̃/R̂/R_param per level, validation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not log_path.exists():  # a run resumed in a fresh folder that has not logged yet
        return
    # A resumed run repeats the steps after its last checkpoint: keep the latest record per step.
    latest: dict[tuple[str, int], dict] = {}
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        latest[(rec.get("kind", "train"), rec["step"])] = rec
    train = sorted((r for (k, _), r in latest.items() if k == "train"), key=lambda r: r["step"])
    val = sorted((r for (k, _), r in latest.items() if k == "val"), key=lambda r: r["step"])
    if not train:
        return
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    steps = [r["step"] for r in train]
    ax[0, 0].plot(steps, [r["loss"] for r in train])
    ax[0, 0].set(title="normalised loss", xlabel="step", yscale="log")
    ax[0, 1].plot(steps, [r["psnr"] for r in train], color="k", lw=0.8)
    ax[0, 1].set(title="PSNR (dB)", xlabel="step")
    # Curves by target rate, not by level index: a level added during the run (`widen --add-level`)
    # shifts the indices of the levels above it.
    targets = sorted({lv["target"] for r in train for lv in r["levels"]})
    cmap = plt.get_cmap("viridis")
    colour = {t: cmap(k / max(1, len(targets) - 1)) for k, t in enumerate(targets)}
    for t in targets:
        pts = [(r["step"], lv) for r in train for lv in r["levels"] if lv["target"] == t and lv["n"] > 0]
        if not pts:
            continue
        s = [p[0] for p in pts]
        ax[1, 0].plot(s, [p[1]["bpp_noisy"] for p in pts], color=colour[t], lw=0.6)
        ax[1, 0].plot(s, [p[1]["r_param"] for p in pts], color=colour[t], ls="--", lw=0.8)
        ax[1, 1].plot(s, [p[1]["bpp_noisy"] - p[1]["bpp_quantized"] for p in pts], color=colour[t], lw=0.6,
                      label=f"{t:g}")
    ax[1, 0].set(title="R̃ (solid) and R_param,t (dashed), bpp", xlabel="step", yscale="log")
    ax[1, 1].set(title="mean rate shift R̃ − R̂ (bpp)", xlabel="step")
    ax[1, 1].legend(fontsize=7, title="target")
    if val:
        labels = ["training batches (all levels)"]
        for t in targets:
            pts = [(r["step"], row["psnr"]) for r in val for row in r["rows"] if row["target"] == t]
            if pts:
                ax[0, 1].plot([p[0] for p in pts], [p[1] for p in pts], color=colour[t], marker=".", lw=0.8)
                labels.append(f"Kodak val {t:g}")
        ax[0, 1].legend(labels, fontsize=6)
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_png)


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/train"))
    p.add_argument("--kodak", type=Path, default=Path("../shared/data/kodak"), help="validation only")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", choices=["hyperprior", "lifting", "factorized"], default="hyperprior")
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--M", type=int, default=None, help="default 96; the lifting architecture has M = 768")
    p.add_argument("--freeze-transform", action="store_true",
                   help="train only the entropy model and the gains (g_a and g_s stay as they are)")
    p.add_argument("--lifting-levels", type=int, nargs="+", default=None, metavar="L",
                   help="lifting: of the transform, only these wavelet levels' learned steps train (1 is the "
                        "finest); the colour matrix and the other levels stay as they are")
    p.add_argument("--noisy-synthesis", action="store_true",
                   help="the training pass reconstructs from y plus uniform noise instead of y rounded "
                        "straight-through (for a transform that learns)")
    p.add_argument("--freeze-hyper-analysis", action="store_true",
                   help="h_a stays as it is: ẑ is the initial model's, and only h_s and the z prior learn "
                        "(on small crops ẑ is all border, and a trained h_a can learn codes that are cheap only there)")
    p.add_argument("--entropy-rate", action="store_true",
                   help="the entropy model (h_a, h_s, the z prior) minimises the rate itself, of y and z "
                        "rounded (straight-through); the loss J trains "
                        "the rest. With --freeze-transform D does not depend on the entropy model, and J's target-rate "
                        "penalty -- zero at the target, reversed below it -- gives it no reason to spend fewer bits")
    p.add_argument("--relative-rate", action="store_true",
                   help="with --entropy-rate, each image's rate divided by its level's target bpp: every level's "
                        "relative rate counts alike (summed bits are dominated by the high levels)")
    p.add_argument("--likelihood", choices=["gaussian", "laplace"], default="gaussian",
                   help="the conditional of y given its predicted mean and scale")
    p.add_argument("--scale-bound", type=float, default=SCALE_BOUND,
                   help="smallest scale of y's conditional (and of the frozen tables); "
                        "with --init, may differ from the initial model's")
    p.add_argument("--coarse-levels", type=int, default=0, choices=[0, 1, 2],
                   help="lifting: more fixed 9/7 levels that split LL4 in place; with --init, may differ from the "
                        "initial model's")
    p.add_argument("--init", type=Path, default=None,
                   help="start a new run from the weights (and gains) of this checkpoint; its likelihood, scale "
                        "bound and coarse levels may differ")
    p.add_argument("--levels", type=float, nargs="+", default=list(DEFAULT_LEVELS))
    p.add_argument("--loss", choices=["best", "adaptive", "baseline", "lambda"], default="best")
    p.add_argument("--beta-scale", type=float, default=1.0, help="multiplies thesis Table 5.3(a) β")
    p.add_argument("--decay-fraction", type=float, default=0.2, help="T of eq. 6.14 as a fraction of --steps")
    p.add_argument("--no-level-norm", action="store_true",
                   help="do not divide each level's loss by its running mean distortion")
    p.add_argument("--level-sampling", choices=["step", "image"], default="step",
                   help="one random level per step (thesis-like) or one per image")
    p.add_argument("--penalty", choices=["batch", "image"], default="batch",
                   help="rate penalty on the batch-mean R̃ of a level (as the thesis) or on every image's R̃")
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--gain-lr-scale", type=float, default=50.0, help="learning-rate multiplier of the rate gains")
    p.add_argument("--lr-drop", type=float, default=0.85, help="fraction of steps after which lr /= 10")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--small-copy", type=Path, default=None,
                   help="at every checkpoint also write here a copy without optimizer state and with fp16 "
                        "weights (about a sixth of the size), to carry a run between machines; it resumes too")
    p.add_argument("--limit-images", type=int, default=None, help="use only the first K images (tests)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


@dataclass
class LogWindow:
    """Sums over the steps since the last log record, per run and per level."""

    levels: int
    loss: float = 0.0
    mse: float = 0.0
    steps: int = 0
    rates: list[list[float]] = field(init=False)  # per level: sum R̃, sum R̂, images

    def __post_init__(self) -> None:
        self.rates = [[0.0, 0.0, 0] for _ in range(self.levels)]

    def add(self, loss: float, mse: float, stats: list[list[float]]) -> None:
        """One step: its loss, its mean MSE and its per-level sums (sum R̃, sum R̂, sum D, images)."""
        for a, (r_noisy, r_quantized, _, n) in zip(self.rates, stats):
            if n > 0:
                a[0] += r_noisy
                a[1] += r_quantized
                a[2] += n
        self.loss += loss
        self.mse += mse
        self.steps += 1


class Trainer:
    """One training run: the model, its optimizer, one `LevelLoss` per level, the running mean
    distortion per level and the data stream, all of which the checkpoint holds.

    Randomness comes from two streams: `gen`, one per rank (crops, flips, levels), saved in the
    checkpoint, so a resumed run draws the batches the uninterrupted one would have; and torch's
    global generator (initial weights, training noise), seeded with `--seed` at every start and
    not saved, so a resumed run's noise is not the uninterrupted run's.
    Under torchrun every rank runs the same steps; rank 0 alone logs, validates and writes.
    """

    def __init__(self, args: argparse.Namespace):
        if args.crop % 64:
            raise SystemExit(f"--crop must be a multiple of 64 (the hyperprior downsamples by 64), got {args.crop}")
        self.args = args
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank = 0
        if self.distributed:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.rank = dist.get_rank()
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
        self.is_main = self.rank == 0
        args.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = args.out / "checkpoint.pt"
        self.log_path = args.out / "log.jsonl"

        if args.M is None:
            args.M = LATENT_CHANNELS if args.arch == "lifting" else 96
        if args.arch == "factorized" and (args.entropy_rate or args.likelihood != "gaussian"):
            raise SystemExit("--entropy-rate and --likelihood are for the hyperprior architectures "
                             "(the factorized prior has no h_a, h_s or conditional of y)")
        self.config = ModelConfig(arch=args.arch, N=args.N, M=args.M, levels=tuple(args.levels),
                                  likelihood=args.likelihood, scale_bound=args.scale_bound,
                                  coarse_levels=args.coarse_levels)
        torch.manual_seed(args.seed)
        self.model = build_model(self.config).to(self.device)
        self.model.noisy_synthesis = args.noisy_synthesis
        if args.freeze_hyper_analysis:
            self.model.hyper_analysis.requires_grad_(False)
        if args.freeze_transform:
            self.model.analysis.requires_grad_(False)
            self.model.synthesis.requires_grad_(False)
        if args.lifting_levels:
            if args.arch != "lifting" or args.freeze_transform:
                raise SystemExit("--lifting-levels is for the lifting architecture, without --freeze-transform")
            if not set(args.lifting_levels) <= set(range(1, WAVELET_LEVELS + 1)):
                raise SystemExit(f"--lifting-levels must be among 1..{WAVELET_LEVELS}, got {args.lifting_levels}")
            self.model.analysis.requires_grad_(False)
            for level in args.lifting_levels:
                self.model.analysis.predict[level - 1].requires_grad_(True)
                self.model.analysis.update[level - 1].requires_grad_(True)
        self.optimizer = self._optimizer()
        self.level_losses: list[LevelLoss] = make_level_losses(args.loss, self.config.levels, args.steps,
                                                               args.beta_scale, args.decay_fraction)
        self.d_mean: list[float | None] = [None] * len(self.config.levels)  # loss normalisation per level
        self.step = 0
        self.lr = args.lr
        self.gen = torch.Generator().manual_seed(args.seed * 1000 + self.rank)
        if self.ckpt_path.exists():
            self.resume()
        elif args.init is not None:
            init = torch.load(args.init, map_location=self.device, weights_only=False)
            same = {"likelihood": args.likelihood, "scale_bound": args.scale_bound, "coarse_levels": args.coarse_levels}
            if ModelConfig.from_dict(init["config"] | same) != self.config:
                raise SystemExit(f"{args.init} was trained with {init['config']}, not {self.config.to_dict()}")
            self.model.load_state_dict({k: v.float() for k, v in init["model"].items()})

        self.images = load_images(args.data, args.limit_images)
        if self.step == 0 and args.init is None and hasattr(self.model, "init_gains"):
            sample = random_batch(self.images, 32, args.crop, torch.Generator().manual_seed(args.seed))
            self.model.init_gains(sample.to(self.device))
        self.train_model = torch.compile(self.model) if args.compile else self.model
        if self.distributed:
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.train_model)
        self.window = LogWindow(len(self.config.levels))

    def _optimizer(self) -> torch.optim.Optimizer:
        """Adam over the trainable parameters. The per-level gains are the only level-specific
        parameters: they must move much faster than the shared weights (`--gain-lr-scale`), or
        every step drags the shared network between targets."""
        gain_params = [p for p in self.model.gains.parameters() if p.requires_grad]
        other_params = [p for n, p in self.model.named_parameters() if not n.startswith("gains.") and p.requires_grad]
        return torch.optim.Adam([{"params": other_params, "lr_scale": 1.0},
                                 {"params": gain_params, "lr_scale": self.args.gain_lr_scale}], lr=self.args.lr)

    def resume(self) -> None:
        """Continue from `checkpoint.pt` of the same configuration: weights, Adam's moments (a
        `--small-copy` has none), loss states, running distortions, step and data streams."""
        ck = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        if ModelConfig.from_dict(ck["config"]) != self.config:
            raise SystemExit(f"{self.ckpt_path} was trained with {ck['config']}, not {self.config.to_dict()}")
        self.model.load_state_dict({k: v.float() for k, v in ck["model"].items()})
        if "optimizer" in ck:  # a --small-copy has none: Adam restarts from zero moments
            try:
                self.optimizer.load_state_dict(ck["optimizer"])
                # The saved groups carry the saving run's lr_scale; this run's flags decide.
                for group, scale in zip(self.optimizer.param_groups, (1.0, self.args.gain_lr_scale)):
                    group["lr_scale"] = scale
            except ValueError:  # other trainable parameters (--freeze-transform changed): Adam restarts
                print("the optimizer state does not fit the trainable parameters; Adam restarts")
        for loss, s in zip(self.level_losses, ck["level_losses"]):
            loss.load_state(s)
        self.d_mean = ck["d_mean"]
        self.step = ck["step"]
        gens = ck["generator"] if isinstance(ck["generator"], list) else [ck["generator"]]
        if self.rank < len(gens):
            self.gen.set_state(gens[self.rank])
        else:  # resumed with more processes than saved it: a fresh stream for this rank
            self.gen.manual_seed(self.args.seed * 1000 + self.rank + 7919 * self.step)
        if self.is_main:
            print(f"resumed from {self.ckpt_path} at step {self.step}")
            drop_log_after(self.log_path, self.step)

    def run(self) -> dict:
        """Train to `--steps`, logging, validating and checkpointing on the way."""
        args = self.args
        last_ckpt = time.monotonic()
        bar = tqdm(total=args.steps, initial=self.step, disable=not self.is_main or args.no_progress, desc="train")
        while self.step < args.steps:
            self.train_step()
            bar.update(1)
            if self.is_main and self.step % args.log_every == 0:
                rec = self.write_log()
                bar.set_postfix(loss=f"{rec['loss']:.3g}", psnr=f"{rec['psnr']:.2f}")
            if self.is_main and (self.step % args.val_every == 0 or self.step == args.steps):
                self.run_validation()
            if self.checkpoint_due(last_ckpt):
                self.save_checkpoint()
                last_ckpt = time.monotonic()
        bar.close()
        if self.distributed:
            dist.destroy_process_group()
        return {"step": self.step, "checkpoint": str(self.ckpt_path)}

    def train_step(self) -> None:
        """One optimizer step on a random batch, each image at a random level.

        J = D + penalty per image, summed per level and weighted by 1 / (the level's running
        mean D) unless `--no-level-norm`, so that every level weighs alike whatever its
        distortion. The per-level statistics are summed over all ranks before the losses see them.
        """
        args, device, L = self.args, self.device, len(self.config.levels)
        self.lr = args.lr * (0.1 if self.step >= args.lr_drop * args.steps else 1.0)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr * g["lr_scale"]
        x = random_batch(self.images, args.batch, args.crop, self.gen).to(device)
        if args.level_sampling == "step":
            q_idx = torch.randint(L, (1,), generator=self.gen).expand(args.batch).contiguous()
        else:
            q_idx = torch.randint(L, (args.batch,), generator=self.gen)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            out = self.train_model(x, q_idx.to(device).float())
        pixels = x.shape[2] * x.shape[3]
        mse = ((out["x_hat"].float() - x) ** 2).mean((1, 2, 3))
        D = mse * 255.0**2
        bpp = out["bits_noisy"].float() / pixels
        bpp_q = out["bits_quantized"].float() / pixels

        stats = torch.zeros(L, 4, device=device)  # per level: sum R̃, sum R̂, sum D, images
        stats.index_add_(0, q_idx.to(device), torch.stack([bpp.detach(), bpp_q, D.detach(), torch.ones_like(D)], 1))
        if self.distributed:
            dist.all_reduce(stats)
        stats = stats.cpu().tolist()
        for lv in range(L):
            if self.d_mean[lv] is None and stats[lv][3] > 0:
                self.d_mean[lv] = stats[lv][2] / stats[lv][3]

        loss = torch.zeros((), device=device)
        for lv, level_loss in enumerate(self.level_losses):
            sel = (q_idx == lv).to(device)
            if not sel.any():
                continue
            rate = bpp[sel].mean() if args.penalty == "batch" else bpp[sel]
            J = D[sel] + level_loss.penalty(rate, self.step)
            weight = 1.0 if args.no_level_norm else 1.0 / self.d_mean[lv]
            loss = loss + weight * J.sum() / args.batch
        self.optimizer.zero_grad(set_to_none=True)
        if args.entropy_rate:
            entropy = self.entropy_parameters()
            rounded = out["bits_rounded"].float() / pixels
            if args.relative_rate:
                rounded = rounded / torch.tensor(self.config.levels, device=device)[q_idx.to(device)]
            rounded = rounded.mean()
            rate_grads = torch.autograd.grad(rounded, entropy, retain_graph=True)
        loss.backward()
        if args.entropy_rate:
            for p, g in zip(entropy, rate_grads):
                if self.distributed:  # DDP averages what backward() computes, not autograd.grad's results
                    dist.all_reduce(g)
                    g /= dist.get_world_size()
                p.grad = g
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip)
        self.optimizer.step()

        for lv, level_loss in enumerate(self.level_losses):
            n = stats[lv][3]
            if n > 0:
                level_loss.observe(stats[lv][0] / n, stats[lv][1] / n, self.step)
                self.d_mean[lv] = 0.99 * self.d_mean[lv] + 0.01 * stats[lv][2] / n
        self.window.add(loss.item(), mse.mean().item(), stats)
        self.step += 1

    def entropy_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters of the entropy model: h_a, h_s and the prior of z."""
        return [p for m in (self.model.hyper_analysis, self.model.hyper_synthesis, self.model.hyper_prior)
                for p in m.parameters() if p.requires_grad]

    def write_log(self) -> dict:
        """Append the record of the steps since the last one (means over them) and start a new window."""
        w = self.window
        levels = []
        for target, level_loss, (r_noisy, r_quantized, n) in zip(self.config.levels, self.level_losses, w.rates):
            levels.append({"target": target, "n": n,
                           "bpp_noisy": r_noisy / n if n else None,
                           "bpp_quantized": r_quantized / n if n else None,
                           "r_param": level_loss.logged_param(self.step - 1), "beta": level_loss.beta})
        rec = {"kind": "train", "step": self.step, "lr": self.lr, "loss": w.loss / w.steps,
               "psnr": psnr(w.mse / w.steps), "time": time.time(), "levels": levels}
        self._append_log(rec)
        self.window = LogWindow(len(self.config.levels))
        return rec

    def run_validation(self) -> None:
        """Log the Kodak validation rows (if the images are there) and redraw the curves."""
        rows = validate(self.model, self.args.kodak, self.device)
        if rows:
            self._append_log({"kind": "val", "step": self.step, "rows": rows})
            coded = rows and rows[0]["bpp_coded"] is not None
            tqdm.write("val " + " ".join(f"{r['target']:g}:{r['bpp_coded']:.3f}/{r['psnr_coded']:.2f}" if coded
                                         else f"{r['target']:g}:{r['bpp_est']:.3f}/{r['psnr']:.2f}" for r in rows))
        plot_curves(self.log_path, self.args.out / "curves.png")

    def _append_log(self, rec: dict) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def checkpoint_due(self, since: float) -> bool:
        """Every `--ckpt-minutes` and at the last step; rank 0's clock decides for all ranks,
        which must join the collective checkpoint at the same step."""
        due = torch.tensor([int(time.monotonic() - since > self.args.ckpt_minutes * 60 or self.step == self.args.steps)])
        if self.distributed:
            dist.broadcast(due, 0)
        return bool(due.item())

    def save_checkpoint(self) -> None:
        """Write `checkpoint.pt` atomically (and the `--small-copy`); every rank's data stream goes in."""
        gens = [self.gen.get_state()]
        if self.distributed:
            gens = [None] * dist.get_world_size()
            dist.all_gather_object(gens, self.gen.get_state())
        if self.is_main:
            args = self.args
            state = {"config": self.config.to_dict(), "model": self.model.state_dict(),
                     "level_losses": [loss.state() for loss in self.level_losses], "d_mean": self.d_mean,
                     "step": self.step, "generator": gens,
                     "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
            save_atomic(state | {"optimizer": self.optimizer.state_dict()}, self.ckpt_path)
            if args.small_copy:
                save_atomic(small_copy(state), args.small_copy)


def main(argv: list[str] | None = None) -> dict:
    return Trainer(parse_args(argv)).run()


if __name__ == "__main__":
    main()
