"""Train the decoder's post-filter (`lcodec.models.postfilter`) of a frozen model.

    python -m lcodec.models.training.postfilter models/weights/lift-97-128-v4.pt --out runs/pf1 \\
        --width 48 --steps 8000
    # writes runs/pf1/checkpoint.pt (resumable: run the same command again) and, at the end,
    # runs/pf1/frozen.pt: the frozen model with the filter, ready for the model table

The codec is frozen first and stays as it is: the filter learns from what the
decoder really gets. Every training image is coded at `--decodes` random rate
parameters q (half of them from the whole range of levels, half from the lowest
three, where the artefacts are strongest) with the codec's own encoder, its
files are decoded up to the synthesis (`engine.decode_latent`,
`FrozenModel.synthesize`), and the filter is fitted to the mean squared error
between its output and the original, on random crops. The last `--val-images`
images are held out: the log reports the filter's PSNR gain on them per
nearest level position q. After the last step they are decoded at every
level, the filter's strength per level is fitted on them (`calibrate`), and
the frozen model with the filter is written.

    python -m lcodec.models.training.postfilter models/archive/lift-97-128-v7.pt --out runs/pf3 \\
        --fine-tune --loss relative --focus 4 8.5 --lr 3e-4 --steps 6000

`--fine-tune` starts from the filter the frozen model has: the training images are decoded
without it (the filter's input) and the model is written with the trained one in its place.
`--focus` sets the range of the second half of the random rates. `--loss relative` divides
each crop's squared error by the unfiltered crop's, so that a crop at 2 bpp weighs as much as
one at 0.06 bpp (the plain mean squared error is dominated by the lowest rates, whose errors
are tens of times larger).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ... import engine
from ...bitstream.container import RATE_SCALE
from ..postfilter import PostFilter
from .freeze import fp16_state, write_frozen
from .train import load_images


def decoded(weights: engine.Weights, image: np.ndarray, qs: list[float]) -> list[np.ndarray]:
    """`image` (H, W, 3) uint8 coded with `weights` at each rate parameter of `qs` and decoded up to
    the post-filter's input: (3, H, W) float16 in [0, 1] each."""
    enc = engine.Encoder(weights.model, image, "RGB")
    out = []
    for q in qs:
        data = enc.file(round(q * RATE_SCALE), 0, weights.digest4)
        header, model, y_hat = engine.decode_latent(data, weights=weights)
        x = model.synthesize(y_hat, header.rate_q / RATE_SCALE)[0, :, :header.height, :header.width]
        out.append(x.half().numpy())
    return out


def training_pairs(weights: engine.Weights, images: torch.Tensor, decodes: int, seed: int, progress: bool,
                   focus: tuple[float, float] = (-0.5, 2.0)) -> tuple[np.ndarray, np.ndarray]:
    """For every image, `decodes` decoded versions at random q, the even ones from the whole range
    of levels, the odd ones from `focus`: (n * decodes, 3, H, W) float16 and the q of each (float32)."""
    L = len(weights.model.levels)
    lo, hi = weights.model.rate_range
    whole = (max(lo, -0.5), min(hi, L - 1 + 0.5))
    focus = (max(lo, focus[0]), min(hi, focus[1]))
    rng = np.random.default_rng(seed)
    xs, qs = [], []
    for image in tqdm(images, desc="decoding", disable=not progress):
        q = [float(rng.uniform(*(focus if k % 2 else whole))) for k in range(decodes)]
        xs += decoded(weights, image.permute(1, 2, 0).numpy(), q)
        qs += q
    return np.stack(xs), np.array(qs, dtype=np.float32)


def psnr_gain(net: PostFilter, x_hat: np.ndarray, q: np.ndarray, x: torch.Tensor) -> np.ndarray:
    """Per decoded image, PSNR of the filtered over the unfiltered (both rounded to 8 bits), in dB."""
    gains = []
    with torch.no_grad():
        for i in range(0, len(q), 16):
            a = torch.from_numpy(x_hat[i:i + 16]).float()
            ref = x[i:i + 16].float()
            before = ((a * 255).round() - ref).square().mean((1, 2, 3))
            after = ((net(a, torch.from_numpy(q[i:i + 16])).clamp(0, 1) * 255).round() - ref).square().mean((1, 2, 3))
            gains += (10 * torch.log10(before / after)).tolist()
    return np.array(gains)


def calibrate(net: PostFilter, weights: engine.Weights, images: torch.Tensor, progress: bool
              ) -> list[tuple[float, float]]:
    """Set the filter's strength at each level q = i to the least-squares factor of its residual
    on `images` decoded at q, clipped to [0, 1]; return (strength, PSNR gain in dB) per level, the
    gain measured on the same decodes at that strength (8-bit rounding, mean over images)."""
    levels = range(len(weights.model.levels))
    decodes = [decoded(weights, image.permute(1, 2, 0).numpy(), [float(level) for level in levels])
               for image in tqdm(images, desc="calibrating", disable=not progress)]
    result = []
    for level in levels:
        x_hat = np.stack([d[level] for d in decodes])
        with torch.no_grad():
            a, target = torch.from_numpy(x_hat).float(), images.float() / 255
            q = torch.full((len(a),), float(level))
            r = torch.cat([net.residual(a[i:i + 16], q[i:i + 16]) for i in range(0, len(a), 16)])
            strength = float(((target - a) * r).sum() / r.square().sum().clamp(min=1e-12))
            net.strength[level] = min(max(strength, 0.0), 1.0)
        result.append((float(net.strength[level]), float(psnr_gain(net, x_hat, q.numpy(), images).mean())))
    return result


def plot_curves(log_path: Path, out_png: Path) -> None:
    """Beside the log: the training PSNR, and the held-out PSNR gain per nearest level over the steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    if not train:
        return
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    key = "psnr" if "psnr" in train[0] else "gain_db"
    ax[0].plot([r["step"] for r in train], [r[key] for r in train], color="k", lw=0.8)
    ax[0].set(title="training PSNR of the filtered crops (dB, all rates)" if key == "psnr"
              else "training error relative to the unfiltered crops (dB)", xlabel="step")
    levels = sorted({k for r in val for k in r["gain_db"]}, key=int)
    cmap = plt.get_cmap("viridis")
    for i, k in enumerate(levels):
        pts = [(r["step"], r["gain_db"][k]) for r in val if k in r["gain_db"]]
        ax[1].plot([p[0] for p in pts], [p[1] for p in pts], color=cmap(i / max(1, len(levels) - 1)), marker=".",
                   lw=0.8, label=f"q ≈ {k}")
    ax[1].axhline(0, color="grey", lw=0.5)
    ax[1].set(title="PSNR gain on held-out images, strength 1 (dB)", xlabel="step")
    ax[1].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("frozen", type=Path, help="the frozen model (without a post-filter, unless --fine-tune)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, default=Path("../shared/data/train"))
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-drop", type=float, default=0.85, help="fraction of steps after which lr /= 10")
    p.add_argument("--decodes", type=int, default=2, help="decoded versions of each training image")
    p.add_argument("--focus", type=float, nargs=2, default=(-0.5, 2.0), metavar=("LO", "HI"),
                   help="the range of q of every second decoded version")
    p.add_argument("--fine-tune", action="store_true", help="start from the frozen model's post-filter")
    p.add_argument("--loss", choices=["mse", "relative"], default="mse",
                   help="relative: each crop's squared error over the unfiltered crop's")
    p.add_argument("--val-images", type=int, default=64)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--limit-images", type=int, default=None, help="use only the first K images (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = engine.Weights.load(args.frozen)
    base = weights.model
    start = base.postfilter
    if start is not None and not args.fine_tune:
        raise SystemExit(f"{args.frozen} already has a post-filter (--fine-tune trains it further)")
    if start is None and args.fine_tune:
        raise SystemExit(f"{args.frozen} has no post-filter to fine-tune")
    base.postfilter = None  # the training images are decoded up to the filter's input
    args.out.mkdir(parents=True, exist_ok=True)
    ck_path, log_path = args.out / "checkpoint.pt", args.out / "log.jsonl"

    images = load_images(args.data, args.limit_images)
    if not 0 < args.val_images < len(images):
        raise SystemExit(f"--val-images must be between 1 and {len(images) - 1}")

    torch.manual_seed(args.seed)
    if start is not None:
        args.width = base.config.postfilter
    net = PostFilter(args.width, len(base.levels))
    if start is not None:
        net.load_state_dict({k: v.float() for k, v in start.state_dict().items()})
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    if ck_path.exists():
        ck = torch.load(ck_path, map_location="cpu", weights_only=False)
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        step = int(ck["step"])

    def checkpoint() -> None:
        tmp = ck_path.with_suffix(".tmp")
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                    "args": {k: str(v) for k, v in vars(args).items()}}, tmp)
        tmp.replace(ck_path)

    def validate() -> None:
        gains = psnr_gain(net, *val)
        nearest = np.clip(np.round(val[1]), 0, len(base.levels) - 1).astype(int)
        per_level = {str(k): round(float(gains[nearest == k].mean()), 4) for k in np.unique(nearest)}
        with open(log_path, "a") as f:
            f.write(json.dumps({"kind": "val", "step": step, "gain_db": per_level, "mean_gain_db": float(gains.mean())}) + "\n")
        tqdm.write(f"val step {step}: gain dB by nearest q {per_level}")

    if step < args.steps:  # the training images are decoded only if there are steps left to train
        x_hat, q = training_pairs(weights, images, args.decodes, args.seed, not args.no_progress, tuple(args.focus))
        x = images.repeat_interleave(args.decodes, 0)
        n_val = args.val_images * args.decodes
        val = (x_hat[-n_val:], q[-n_val:], x[-n_val:])
        x_hat, q, x = x_hat[:-n_val], q[:-n_val], x[:-n_val]
        n, _, H, W = x.shape
    last_ckpt, losses = time.time(), []
    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress, desc="post-filter")
    while step < args.steps:
        lr = args.lr / 10 if step >= args.lr_drop * args.steps else args.lr
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(n, (args.batch,), generator=gen)
        top = 2 * torch.randint((H - args.crop) // 2 + 1, (1,), generator=gen).item()
        left = 2 * torch.randint((W - args.crop) // 2 + 1, (1,), generator=gen).item()
        rows, cols = slice(top, top + args.crop), slice(left, left + args.crop)
        a = torch.from_numpy(x_hat[idx.numpy(), :, rows, cols]).float()
        target = x[idx][:, :, rows, cols].float() / 255
        error = (net(a, torch.from_numpy(q[idx.numpy()])) - target).square().mean((1, 2, 3))
        if args.loss == "relative":
            error = error / (a - target).square().mean((1, 2, 3)).clamp(min=1e-8)
        loss = error.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % 100 == 0:
            rec = {"kind": "train", "step": step, "lr": lr, "time": time.time()}
            if args.loss == "mse":
                rec["psnr"] = -10 * math.log10(np.mean(losses))
            else:  # the mean squared error relative to the unfiltered crops', in dB
                rec["gain_db"] = -10 * math.log10(np.mean(losses))
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            losses = []
        if step % args.val_every == 0 or step == args.steps:
            validate()
        if time.time() - last_ckpt > 60 * args.ckpt_minutes or step == args.steps:
            checkpoint()
            plot_curves(log_path, args.out / "curves.png")
            last_ckpt = time.time()
    bar.close()

    levels = calibrate(net, weights, images[-args.val_images:], not args.no_progress)
    with open(log_path, "a") as f:
        f.write(json.dumps({"kind": "calibration", "step": step, "strength": [s for s, _ in levels],
                            "gain_db": [g for _, g in levels]}) + "\n")
    print("per level: strength / PSNR gain on the held-out images (dB):",
          ", ".join(f"{s:.2f}/{g:+.3f}" for s, g in levels))
    state = torch.load(args.frozen, map_location="cpu", weights_only=True)
    state["config"] = dict(state["config"], postfilter=args.width)
    state["postfilter"] = fp16_state(net)
    info = {"step": step, "base": args.frozen.name, "base_sha256": weights.sha256}
    if start is not None:
        info |= {"fine_tuned": dict(state.get("info", {}).get("postfilter", {})), "loss": args.loss,
                 "focus": list(args.focus)}
    state["info"] = dict(state.get("info", {}), postfilter=info)
    digest = write_frozen(state, args.out / "frozen.pt")
    print(f"{args.out / 'frozen.pt'}: sha256 {digest} (post-filter step {step})")


if __name__ == "__main__":
    main()
