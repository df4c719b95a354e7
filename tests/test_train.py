"""A few real training steps on tiny generated data: logging, resuming, two-process DDP."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lcodec.models
from lcodec.models.networks import MeanScaleHyperprior, ModelConfig
from lcodec.models.training import train


@pytest.fixture()
def tiny_data(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(6):
        base = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((64, 64), Image.BILINEAR)
        img.save(folder / f"img{i}.png")
    return folder


def _args(data, out, steps, extra=()):
    return ["--data", str(data), "--kodak", str(data / "none"), "--out", str(out), "--N", "8", "--M", "12",
            "--steps", str(steps), "--batch", "4", "--crop", "64", "--log-every", "2", "--val-every", "1000",
            "--no-progress", "--threads", "1", *extra]


def test_training_logs_every_level_quantity_and_resumes(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(_args(tiny_data, out, 4))
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 4
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [2, 4]
    level = next(lv for r in recs for lv in r["levels"] if lv["n"])
    assert {"bpp_noisy", "bpp_quantized", "r_param", "target", "beta"} <= level.keys()
    assert level["bpp_noisy"] > 0 and level["bpp_quantized"] > 0

    # Running the same command with more steps continues from the checkpoint. A record logged after
    # the checkpoint (a run killed between two checkpoints) is dropped: the step is trained again.
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(recs[-1] | {"step": 6}) + "\n")
    result = train.main(_args(tiny_data, out, 6))
    assert result["step"] == 6
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [2, 4, 6]


def test_training_reduces_the_loss_on_tiny_data(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(_args(tiny_data, out, 40, ["--log-every", "10", "--lr", "1e-3", "--loss", "lambda"]))
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"train"' in line]
    assert recs[-1]["psnr"] > recs[0]["psnr"]


def test_resume_refuses_another_architecture(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(_args(tiny_data, out, 2))
    with pytest.raises(SystemExit, match="trained with"):
        train.main(_args(tiny_data, out, 4, ["--M", "16"]))


def test_factorized_prior_model_trains(tiny_data, tmp_path):
    result = train.main(_args(tiny_data, tmp_path / "fp", 2, ["--arch", "factorized"]))
    assert result["step"] == 2


def test_quantized_rate_estimate_matches_rounded_latents():
    torch.manual_seed(0)
    model = MeanScaleHyperprior(ModelConfig(N=8, M=12)).eval()
    x = torch.rand(1, 3, 64, 64)
    q = torch.tensor([2.0])
    train_out = model(x, q)
    eval_out = model.evaluate(x, q)
    assert train_out["bits_quantized"].item() == pytest.approx(eval_out["bits"].item(), rel=1e-5)


def test_distributed_training_with_two_gloo_processes(tiny_data, tmp_path):
    """Two processes resume a one-process checkpoint (the second rank starts a fresh data stream)."""
    out = tmp_path / "ddp"
    train.main(_args(tiny_data, out, 2))
    # --standalone: the rendezvous takes a free port, so another job on the machine cannot collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lcodec.models.training.train", *_args(tiny_data, out, 4)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    # On failure the ranks' own messages come first in stderr, the launcher's summary last.
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-1000:]
    assert "resumed from" in proc.stdout
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 4
    assert len(ck["generator"]) == 2  # each rank's data stream is saved for resuming


def test_small_copy_resumes_without_optimizer_state(tiny_data, tmp_path):
    """--small-copy (fp16 weights, no Adam moments) is what travels between machines; it resumes."""
    out, small = tmp_path / "run", tmp_path / "small.pt"
    train.main(_args(tiny_data, out, 2, ["--small-copy", str(small)]))
    full, copy = (torch.load(p, weights_only=False) for p in (out / "checkpoint.pt", small))
    assert "optimizer" not in copy and copy["step"] == 2
    assert all(v.dtype == torch.float16 for v in copy["model"].values() if v.is_floating_point())
    assert small.stat().st_size < (out / "checkpoint.pt").stat().st_size / 4
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "checkpoint.pt").write_bytes(small.read_bytes())
    train.main(_args(tiny_data, moved, 4))
    assert torch.load(moved / "checkpoint.pt", weights_only=False)["step"] == 4
    assert full["level_losses"] == copy["level_losses"]


@pytest.mark.parametrize("name", ["hp-64-96-run.pt", "lift-97-128-run.pt"])
def test_committed_checkpoint_resumes(tiny_data, tmp_path, name):
    """Each checkpoint shipped in models/checkpoints/ is where the next training run starts: one more step."""
    shipped = Path(lcodec.models.__file__).parent / "checkpoints" / name
    out = tmp_path / "run"
    out.mkdir()
    shutil.copyfile(shipped, out / "checkpoint.pt")
    ck = torch.load(shipped, weights_only=False)
    shape = ["--arch", ck["config"]["arch"], "--N", str(ck["config"]["N"]),  # the later flag wins
             "--M", str(ck["config"]["M"]), "--levels", *map(str, ck["config"]["levels"])]
    train.main(_args(tiny_data, out, ck["step"] + 1, shape))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == ck["step"] + 1


def _model(checkpoint: dict) -> MeanScaleHyperprior:
    model = MeanScaleHyperprior(ModelConfig.from_dict(checkpoint["config"])).eval()
    model.load_state_dict(checkpoint["model"])
    return model


def test_widening_the_latent_keeps_the_reconstruction_and_trains_on(tiny_data, tmp_path):
    """lcodec.models.training.widen: M 12 -> 20 reproduces x_hat, and training resumes from it."""
    from lcodec.models.training import widen

    out = tmp_path / "run"
    train.main(_args(tiny_data, out, 2))
    wide_dir = tmp_path / "wide"
    widen.main([str(out / "checkpoint.pt"), str(wide_dir / "checkpoint.pt"), "--M", "20"])
    old_ck, new_ck = (torch.load(p, weights_only=False) for p in (out / "checkpoint.pt", wide_dir / "checkpoint.pt"))
    assert new_ck["config"]["M"] == 20 and new_ck["step"] == 2 and "optimizer" not in new_ck
    models = [_model(ck) for ck in (old_ck, new_ck)]
    x, q = torch.rand(1, 3, 64, 64), torch.tensor([7.0])
    # The same function; only the float summation order of the wider convolutions differs.
    torch.testing.assert_close(models[1].evaluate(x, q)["x_hat"], models[0].evaluate(x, q)["x_hat"], atol=1e-6, rtol=1e-5)
    with pytest.raises(SystemExit, match="exists"):
        widen.main([str(out / "checkpoint.pt"), str(wide_dir / "checkpoint.pt"), "--M", "20"])
    assert train.main(_args(tiny_data, wide_dir, 3, ["--M", "20"]))["step"] == 3


def test_narrowing_the_latent_cuts_silent_channels_and_trains_on(tiny_data, tmp_path):
    """lcodec.models.training.widen with a smaller M: the channels of y and the h_s hidden units that do nothing
    are the ones cut, the narrow model computes the same x_hat and bits, and training resumes from it."""
    from lcodec.models.training import widen

    out = tmp_path / "run"
    train.main(_args(tiny_data, out, 2))
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    state = ck["model"]
    silent, silent1, silent2 = [1, 4, 6, 11], [0, 3, 5, 9], [2, 4, 8, 10, 13, 17]  # 12 -> 8: cut 4, 4 and 6
    kept = [c for c in range(12) if c not in silent]
    with torch.no_grad():
        state["gains.log_gain"][:, kept] += 3.0  # loud: many bits at every level, even untrained
        state["gains.log_gain"][:, silent] = -40.0  # y rounds to 0 at every level
        for c in silent:  # their mean and scale: 0 (the scale's lower bound), so they cost no bits
            for row in (c, 12 + c):
                state["hyper_synthesis.4.weight"][row] = 0
                state["hyper_synthesis.4.bias"][row] = 0
        state["hyper_synthesis.2.weight"][silent1] = 0  # hidden units nothing reads
        state["hyper_synthesis.4.weight"][:, silent2] = 0
    torch.save(ck, out / "checkpoint.pt")
    narrow = tmp_path / "narrow" / "checkpoint.pt"
    with pytest.raises(SystemExit, match="--data"):
        widen.main([str(out / "checkpoint.pt"), str(narrow), "--M", "8"])
    widen.main([str(out / "checkpoint.pt"), str(narrow), "--M", "8", "--data", str(tiny_data)])
    new_ck = torch.load(narrow, weights_only=False)
    assert new_ck["config"]["M"] == 8 and new_ck["step"] == 2
    torch.testing.assert_close(new_ck["model"]["gains.log_gain"], state["gains.log_gain"][:, kept])
    models = [_model(c) for c in (ck, new_ck)]
    x = torch.rand(1, 3, 64, 64)
    for q in (0.0, 7.0):
        a, b = (m.evaluate(x, torch.tensor([q])) for m in models)
        torch.testing.assert_close(b["x_hat"], a["x_hat"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b["bits"], a["bits"], atol=0.01, rtol=1e-4)
    assert train.main(_args(tiny_data, narrow.parent, 3, ["--M", "8"]))["step"] == 3


def test_adding_a_level_keeps_the_others_and_starts_it_where_the_gains_put_its_rate(tiny_data, tmp_path):
    """lcodec.models.training.widen --add-level: the old levels keep their gains and loss states, the new one
    starts at the rate parameter that log-linear interpolation of the targets gives, training resumes."""
    from lcodec.models.training import widen

    out = tmp_path / "run"
    train.main(_args(tiny_data, out, 2))
    old_ck = torch.load(out / "checkpoint.pt", weights_only=False)
    added = tmp_path / "nine" / "checkpoint.pt"
    widen.main([str(out / "checkpoint.pt"), str(added), "--add-level", "0.03"])
    new_ck = torch.load(added, weights_only=False)
    assert list(new_ck["config"]["levels"]) == [0.03, 0.06, 0.12, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
    assert new_ck["level_losses"][1:] == old_ck["level_losses"] and new_ck["d_mean"][1:] == old_ck["d_mean"]
    assert new_ck["d_mean"][0] is None and new_ck["level_losses"][0]["ema"] is None
    old_model, new_model = _model(old_ck), _model(new_ck)
    torch.testing.assert_close(new_model.gains.log_gain[1:], old_model.gains.log_gain)
    for q_new, q_old in ((0.0, -1.0), (1.0, 0.0), (8.0, 7.0)):  # 0.03 bpp is one level below 0.06
        for a, b in zip(new_model.gains(torch.tensor([q_new])), old_model.gains(torch.tensor([q_old]))):
            torch.testing.assert_close(a, b)
    with pytest.raises(SystemExit, match="cannot add a level"):
        widen.main([str(added), str(tmp_path / "again.pt"), "--add-level", "0.12"])
    with pytest.raises(SystemExit, match="one of"):
        widen.main([str(added), str(tmp_path / "again.pt")])
    levels = ["--levels", *map(str, new_ck["config"]["levels"])]
    assert train.main(_args(tiny_data, added.parent, 6, levels))["step"] == 6


def test_integer_hyper_synthesis_survives_channels_with_zero_weights():
    """A freshly widened h_s has output channels whose weights are all zero; their bias must stay exact."""
    from lcodec.models.integer_hyper import BIAS_LIMIT, quantize_hyper_synthesis

    model = MeanScaleHyperprior(ModelConfig(N=8, M=12))
    with torch.no_grad():
        model.hyper_synthesis[4].weight[3:5] = 0
        model.hyper_synthesis[4].bias[3:5] = torch.tensor([0.7, -2.0])
    layers = quantize_hyper_synthesis(model.hyper_synthesis)
    last = layers[-1]
    assert last["bias"].abs().max().item() <= BIAS_LIMIT
    got = last["bias"][3:5].double() * torch.exp2(-last["shift"][3:5].double() - 16)  # back to float units
    assert got.tolist() == pytest.approx([0.7, -2.0], abs=2**-16)


def test_validation_counts_really_coded_bits(tmp_path):
    """validate() freezes the model and range-codes real files; their rate follows the estimate."""
    torch.manual_seed(0)
    model = MeanScaleHyperprior(ModelConfig(N=8, M=12))
    kodak = tmp_path / "kodak"
    kodak.mkdir()
    rng = np.random.default_rng(1)
    for name in train.VALIDATION_IMAGES[:2]:
        small = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
        Image.fromarray(small).resize((192, 128), Image.BILINEAR).save(kodak / name)
    rows = train.validate(model, kodak, torch.device("cpu"))
    assert len(rows) == len(model.config.levels) and model.training
    overhead = 8 * 21 / (192 * 128)  # the header and CRC of every file
    for r in rows:
        assert r["bpp_coded"] == pytest.approx(r["bpp_est"] + overhead, rel=0.05, abs=0.01)
        # The decoded file against the float model: fp16 weights and the integer h_s, 8-bit pixels.
        assert r["psnr_coded"] == pytest.approx(r["psnr"], abs=0.5)


def test_a_resumed_run_takes_this_runs_gain_learning_rate(tiny_data, tmp_path):
    """Adam's saved groups hold the saving run's lr scale; the flags of the resumed run decide."""
    out = tmp_path / "run"
    train.main(_args(tiny_data, out, 2, ["--gain-lr-scale", "0"]))
    frozen_gains = torch.load(out / "checkpoint.pt", weights_only=False)["model"]["gains.log_gain"].clone()
    train.main(_args(tiny_data, out, 4, ["--gain-lr-scale", "50"]))
    gains = torch.load(out / "checkpoint.pt", weights_only=False)["model"]["gains.log_gain"]
    assert not torch.equal(gains, frozen_gains)
