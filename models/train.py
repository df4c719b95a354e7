"""Train a variable-rate model with the thesis's target-rate loss.

    python -m lcodec.models.train --data ../shared/data/train --out runs/hp64 --steps 12000

One network serves every level of `--levels`; each training image gets a random
level, and each level keeps its own loss state (R_param,t, EMA, β). The run is
resumable: `--out` holds `checkpoint.pt` (rewritten atomically every
`--ckpt-minutes`), `log.jsonl` (one line per logged step and per validation)
and `curves.png`. Running the same command again continues where it stopped.

CPU, one GPU (`--amp` for bf16 autocast) or several processes under
`torchrun --nproc_per_node K -m lcodec.models.train ...` (DistributedDataParallel;
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
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from .losses import make_level_losses
from .lifting import LATENT_CHANNELS
from .networks import DEFAULT_LEVELS, MeanScaleHyperprior, ModelConfig, build_model

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
    """Per level, on a few Kodak images: the mean estimated bpp of the rounded latents, the mean
    bpp of really coded files (the model frozen as the codec would ship it, one pass at the level,
    header included; hyperprior only) and the mean PSNR of the rounded latents' reconstruction."""
    files = [kodak / f for f in VALIDATION_IMAGES if (kodak / f).exists()]
    if not files:
        return []
    images = [np.array(Image.open(f).convert("RGB")) for f in files]
    model.eval()
    coded = coded_bpp(model, images)
    rows = []
    for i, r in enumerate(model.config.levels):
        bpps, psnrs = [], []
        for pixels in images:
            x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float().to(device) / 255
            out = model.evaluate(x, torch.tensor([float(i)], device=device))
            bpps.append(out["bits"].item() / (x.shape[2] * x.shape[3]))
            psnrs.append(psnr(torch.mean((out["x_hat"].clamp(0, 1) - x) ** 2).item()))
        rows.append({"level": i, "target": r, "bpp_est": float(np.mean(bpps)),
                     "bpp_coded": coded[i] if coded else None, "psnr": float(np.mean(psnrs))})
    model.train()
    return rows


def coded_bpp(model: torch.nn.Module, images: list[np.ndarray]) -> list[float] | None:
    """Mean real bpp per level of one-pass .lc files: freeze a copy of the model and code with it."""
    if not isinstance(model, MeanScaleHyperprior):
        return None
    from .. import engine  # lazy: the codec is only needed here
    from .freeze import freeze
    from .frozen import FrozenModel

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frozen.pt"
        try:
            freeze(copy.deepcopy(model).cpu(), path)
        except ValueError as e:  # e.g. an h_s that integer arithmetic cannot hold exactly
            tqdm.write(f"validation: cannot freeze this model ({e}); no coded rates")
            return None
        frozen = FrozenModel(path)
    rates = [float(i) for i in range(len(model.config.levels))]
    sizes = np.array([engine.coded_sizes(frozen, pixels, "RGB", rates) for pixels in images])  # images x levels
    pixels_n = np.array([p.shape[0] * p.shape[1] for p in images])[:, None]
    return (8 * sizes / pixels_n).mean(0).tolist()


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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.crop % 64:
        raise SystemExit(f"--crop must be a multiple of 64 (the hyperprior downsamples by 64), got {args.crop}")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank = dist.get_rank()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    is_main = rank == 0
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "checkpoint.pt"
    log_path = args.out / "log.jsonl"

    if args.M is None:
        args.M = LATENT_CHANNELS if args.arch == "lifting" else 96
    config = ModelConfig(arch=args.arch, N=args.N, M=args.M, levels=tuple(args.levels))
    torch.manual_seed(args.seed)
    model = build_model(config).to(device)
    if args.freeze_transform:
        model.analysis.requires_grad_(False)
        model.synthesis.requires_grad_(False)
    # The per-level gains are the only level-specific parameters: they must move much faster
    # than the shared weights, or every step drags the shared network between targets.
    gain_params = [p for p in model.gains.parameters() if p.requires_grad]
    other_params = [p for n, p in model.named_parameters() if not n.startswith("gains.") and p.requires_grad]
    optimizer = torch.optim.Adam([{"params": other_params, "lr_scale": 1.0},
                                  {"params": gain_params, "lr_scale": args.gain_lr_scale}], lr=args.lr)
    level_losses = make_level_losses(args.loss, config.levels, args.steps, args.beta_scale, args.decay_fraction)
    d_mean = [None] * len(config.levels)  # running mean distortion per level (loss normalisation)
    step = 0
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)

    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ModelConfig.from_dict(ck["config"]) != config:
            raise SystemExit(f"{ckpt_path} was trained with {ck['config']}, not {config.to_dict()}")
        model.load_state_dict({k: v.float() for k, v in ck["model"].items()})
        if "optimizer" in ck:  # a --small-copy has none: Adam restarts from zero moments
            try:
                optimizer.load_state_dict(ck["optimizer"])
            except ValueError:  # other trainable parameters (--freeze-transform changed): Adam restarts
                print("the optimizer state does not fit the trainable parameters; Adam restarts")
        for st, s in zip(level_losses, ck["level_losses"]):
            st.load_state(s)
        d_mean = ck["d_mean"]
        step = ck["step"]
        gens = ck["generator"] if isinstance(ck["generator"], list) else [ck["generator"]]
        if rank < len(gens):
            gen.set_state(gens[rank])
        else:  # resumed with more processes than saved it: a fresh stream for this rank
            gen.manual_seed(args.seed * 1000 + rank + 7919 * step)
        if is_main:
            print(f"resumed from {ckpt_path} at step {step}")
            drop_log_after(log_path, step)

    images = load_images(args.data, args.limit_images)
    if step == 0 and hasattr(model, "init_gains"):
        sample = random_batch(images, 32, args.crop, torch.Generator().manual_seed(args.seed))
        model.init_gains(sample.to(device))
    train_model = torch.compile(model) if args.compile else model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)
    L = len(config.levels)
    last_ckpt = time.monotonic()
    acc = {"loss": 0.0, "mse": 0.0, "n": 0, "levels": [[0.0, 0.0, 0] for _ in range(L)]}
    bar = tqdm(total=args.steps, initial=step, disable=not is_main or args.no_progress, desc="train")

    def checkpoint() -> None:
        gens = [gen.get_state()]
        if distributed:
            gens = [None] * dist.get_world_size()
            dist.all_gather_object(gens, gen.get_state())
        if is_main:
            state = {"config": config.to_dict(), "model": model.state_dict(),
                     "level_losses": [s.state() for s in level_losses], "d_mean": d_mean, "step": step,
                     "generator": gens, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
            save_atomic(state | {"optimizer": optimizer.state_dict()}, ckpt_path)
            if args.small_copy:
                save_atomic(small_copy(state), args.small_copy)

    while step < args.steps:
        lr = args.lr * (0.1 if step >= args.lr_drop * args.steps else 1.0)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        x = random_batch(images, args.batch, args.crop, gen).to(device)
        if args.level_sampling == "step":
            q_idx = torch.randint(L, (1,), generator=gen).expand(args.batch).contiguous()
        else:
            q_idx = torch.randint(L, (args.batch,), generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            out = train_model(x, q_idx.to(device).float())
        pixels = x.shape[2] * x.shape[3]
        mse = ((out["x_hat"].float() - x) ** 2).mean((1, 2, 3))
        D = mse * 255.0**2
        bpp = out["bits_noisy"].float() / pixels
        bpp_q = out["bits_quantized"].float() / pixels

        # Per-level statistics of this step (all ranks together), used by the time-adaptive losses.
        stats = torch.zeros(L, 4, device=device)  # sum R̃, sum R̂, sum D, count
        stats.index_add_(0, q_idx.to(device), torch.stack([bpp.detach(), bpp_q, D.detach(), torch.ones_like(D)], 1))
        if distributed:
            dist.all_reduce(stats)
        stats = stats.cpu().tolist()

        for lv in range(L):
            if d_mean[lv] is None and stats[lv][3] > 0:
                d_mean[lv] = stats[lv][2] / stats[lv][3]
        loss = torch.zeros((), device=device)
        for lv in range(L):
            sel = (q_idx == lv).to(device)
            if not sel.any():
                continue
            st = level_losses[lv]
            if args.penalty == "batch":
                J = D[sel] + st.penalty(bpp[sel].mean(), step)
            else:
                J = D[sel] + st.penalty(bpp[sel], step)
            weight = 1.0 if args.no_level_norm else 1.0 / d_mean[lv]
            loss = loss + weight * J.sum() / args.batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()

        for lv in range(L):
            n = stats[lv][3]
            if n > 0:
                level_losses[lv].observe(stats[lv][0] / n, stats[lv][1] / n, step)
                d_mean[lv] = 0.99 * d_mean[lv] + 0.01 * stats[lv][2] / n
                a = acc["levels"][lv]
                a[0] += stats[lv][0]
                a[1] += stats[lv][1]
                a[2] += n
        acc["loss"] += loss.item()
        acc["mse"] += mse.mean().item()
        acc["n"] += 1
        step += 1
        bar.update(1)

        if is_main and step % args.log_every == 0:
            levels = []
            for lv, a in enumerate(acc["levels"]):
                st = level_losses[lv]
                levels.append({"target": config.levels[lv], "n": a[2],
                               "bpp_noisy": a[0] / a[2] if a[2] else None,
                               "bpp_quantized": a[1] / a[2] if a[2] else None,
                               "r_param": st.logged_param(step - 1) if hasattr(st, "logged_param") else st.current_param(step - 1), "beta": getattr(st, "beta", None)})
            rec = {"kind": "train", "step": step, "lr": lr, "loss": acc["loss"] / acc["n"],
                   "psnr": psnr(acc["mse"] / acc["n"]), "time": time.time(), "levels": levels}
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.3g}", psnr=f"{rec['psnr']:.2f}")
            acc = {"loss": 0.0, "mse": 0.0, "n": 0, "levels": [[0.0, 0.0, 0] for _ in range(L)]}

        if is_main and (step % args.val_every == 0 or step == args.steps):
            rows = validate(model, args.kodak, device)
            if rows:
                with log_path.open("a") as f:
                    f.write(json.dumps({"kind": "val", "step": step, "rows": rows}) + "\n")
                tqdm.write("val " + " ".join(f"{r['target']:g}:{r['bpp_est']:.3f}/{r['psnr']:.2f}" for r in rows))
            plot_curves(log_path, args.out / "curves.png")

        due = torch.tensor([int(time.monotonic() - last_ckpt > args.ckpt_minutes * 60 or step == args.steps)])
        if distributed:
            dist.broadcast(due, 0)  # every rank must join the collective checkpoint at the same step
        if due.item():
            checkpoint()
            last_ckpt = time.monotonic()

    bar.close()
    if distributed:
        dist.destroy_process_group()
    return {"step": step, "checkpoint": str(ckpt_path)}


if __name__ == "__main__":
    main()
