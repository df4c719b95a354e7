"""kodak_eval: metric definitions on known arrays, the peer search, and a quick run on tiny images."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kodak_eval is run from the repo, not installed

from kodak_eval import codecs, metrics  # noqa: E402
from kodak_eval.evaluate import evaluate  # noqa: E402
from kodak_eval.search import Prober, search  # noqa: E402


def test_psnr_of_a_known_error():
    ref = np.zeros((4, 5, 3), np.uint8)
    dec = np.full((4, 5, 3), 10, np.uint8)  # MSE = 100 over every RGB value
    assert metrics.psnr(ref, dec) == pytest.approx(10 * math.log10(255**2 / 100))
    dec[0, 0, 0] = 0  # one value right: MSE = 100 * 59 / 60
    assert metrics.psnr(ref, dec) == pytest.approx(10 * math.log10(255**2 / (100 * 59 / 60)))


def test_psnr_of_identical_images_is_infinite_and_shapes_must_match():
    a = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
    assert metrics.psnr(a, a) == math.inf
    with pytest.raises(ValueError):
        metrics.psnr(a, a[:3])


def test_bpp_counts_every_byte_of_the_file():
    assert metrics.bpp(12288, 512, 768) == 0.25
    assert metrics.bpp(1, 1, 1) == 8.0
    assert metrics.byte_budget(0.25, 512, 768) == 12288  # exact: no byte lost to float error
    assert metrics.byte_budget(0.06, 512, 768) == 2949  # 2949.12 rounds down: the file must not exceed the target
    for t in (0.06, 0.12, 0.75, 1.5):
        assert metrics.bpp(metrics.byte_budget(t, 512, 768), 512, 768) <= t


def test_ssim_of_identical_images_is_one_and_ms_ssim_needs_161_px():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    s, m = metrics.ssim_pair(small, small)
    assert s == pytest.approx(1.0) and m is None
    big = rng.integers(0, 256, (161, 170, 3), dtype=np.uint8)
    s, m = metrics.ssim_pair(big, big)
    assert m == pytest.approx(1.0)


RATES = [0.12, 0.25, 0.5, 0.75, 1.0]
PSNRS = [27.0, 29.5, 32.0, 34.0, 35.5]


@pytest.mark.parametrize("method", ["pchip", "polynomial"])
def test_bd_rate_of_identical_curves_is_zero(method):
    assert metrics.bd_rate(RATES, PSNRS, RATES, PSNRS, method) == pytest.approx(0.0, abs=1e-9)
    assert metrics.bd_psnr(RATES, PSNRS, RATES, PSNRS, method) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", ["pchip", "polynomial"])
@pytest.mark.parametrize("factor", [0.8, 1.25])
def test_bd_rate_of_a_curve_scaled_in_rate_is_the_factor(method, factor):
    # Same PSNR at `factor` times the rate: BD-rate is exactly factor - 1 whatever the interpolation.
    scaled = [r * factor for r in RATES]
    assert metrics.bd_rate(RATES, PSNRS, scaled, PSNRS, method) == pytest.approx((factor - 1) * 100, rel=1e-9)


def test_bd_psnr_of_a_curve_shifted_in_psnr_is_the_shift():
    assert metrics.bd_psnr(RATES, PSNRS, RATES, [p + 0.7 for p in PSNRS]) == pytest.approx(0.7)
    assert metrics.bd_rate(RATES, PSNRS, RATES, [p + 0.7 for p in PSNRS]) < 0  # better test codec saves bits


def test_bd_needs_overlap():
    assert metrics.bd_rate([0.1, 0.2], [20, 21], [1, 2], [40, 41]) is None
    assert metrics.bd_rate([0.1], [20], [0.1, 0.2], [20, 21]) is None


def test_rate_accuracy_shares():
    acc = metrics.rate_accuracy([1.0, 0.99, 0.96, 1.1, 1.2, None], 1.0)
    assert (acc.n_images, acc.n_files) == (6, 5)
    assert acc.within_15pct == pytest.approx(4 / 6)  # 1.2 and the missing file are outside
    assert acc.within_m3_0pct == pytest.approx(2 / 6)  # 1.0 and 0.99; 0.96 is 4 % low, 1.1 is over
    assert acc.min == 0.96 and acc.max == 1.2
    assert acc.std == pytest.approx(np.std([1.0, 0.99, 0.96, 1.1, 1.2]))


def _prober(sizes):
    return Prober(lambda i: b"x" * sizes[i], len(sizes))


def test_search_finds_the_highest_quality_that_fits():
    sizes = [10, 20, 30, 40, 50, 60, 70, 80]
    p = _prober(sizes)
    for budget, want in [(10, 0), (35, 2), (40, 3), (79, 6)]:
        r = search(p, budget)
        assert (r.index, r.status) == (want, "ok") and len(r.probe.data) <= budget
    assert search(p, 9).status == "overshoot" and search(p, 9).index == 0
    assert search(p, 80).status == "undershoot" and search(p, 80).index == 7


def test_search_matches_exhaustive_scan_from_any_hint():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 120))
        sizes = np.cumsum(rng.integers(0, 50, n)) + int(rng.integers(1, 30))  # non-decreasing, plateaus allowed
        budget = int(rng.integers(0, sizes[-1] + 30))
        hint = None if rng.random() < 0.2 else int(rng.integers(-3, n + 3))
        r = search(_prober([int(x) for x in sizes]), budget, hint)
        fitting = [i for i in range(n) if sizes[i] <= budget]
        if not fitting:
            assert (r.index, r.status) == (0, "overshoot")
        elif fitting[-1] == n - 1:
            assert (r.index, r.status) == (n - 1, "undershoot")
        else:
            assert (r.index, r.status) == (fitting[-1], "ok")


def test_search_reuses_probes_between_targets():
    p = _prober(list(range(100, 10100, 100)))  # 100 qualities
    first = search(p, 5000)
    second = search(p, 5050)  # same answer: every probe it needs is memoised
    assert first.encodes <= 9 and second.encodes == 0 and second.index == first.index


def test_ycbcr_round_trip_is_within_one_level():
    rgb = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    back = codecs.ycbcr_to_rgb(codecs.rgb_to_ycbcr(rgb))
    assert np.abs(back.astype(int) - rgb).max() <= 2


def test_any_png_becomes_8_bit_rgb(tmp_path):
    from kodak_eval.bench import load_rgb

    grey16 = (np.arange(12 * 10, dtype=np.uint16).reshape(10, 12) * 500).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.fromarray(np.full((10, 12), 7, np.uint8)).save(tmp_path / "g8.png")
    Image.fromarray(np.full((10, 12, 4), 9, np.uint8)).save(tmp_path / "rgba.png")
    a, note = load_rgb(tmp_path / "g16.png")
    assert a.shape == (10, 12, 3) and a.dtype == np.uint8 and a[-1, -1, 0] == round(119 * 500 * 255 / 65535)
    assert "I;16" in note
    a, note = load_rgb(tmp_path / "g8.png")
    assert a.shape == (10, 12, 3) and (a == 7).all() and "mode L" in note
    a, note = load_rgb(tmp_path / "rgba.png")
    assert a.shape == (10, 12, 3) and "alpha dropped" in note


def _images(folder: Path, sizes=((64, 48), (65, 49))) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        a = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1) + rng.integers(-12, 12, (h, w, 3))
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def _installed_peers() -> list[str]:
    return [c.name for c in codecs.make_codecs([p.name for p in codecs.PEERS]) if c.unavailable() is None]


def test_quick_run_on_two_small_images(tmp_path):
    peers = _installed_peers()
    # The test extra installs every peer (pip install -e '.[test]'): none may drop out of the run unnoticed.
    every = codecs.make_codecs([p.name for p in codecs.PEERS])
    assert peers == [c.name for c in every], {c.name: c.unavailable() for c in every}
    images = _images(tmp_path / "img")
    cache = tmp_path / "cache.jsonl"
    out = evaluate(images=images, out=tmp_path / "out", codecs=peers, targets=[0.5, 2.0], cache_path=cache,
                   progress=False)
    assert out.exit_code == 0, out.failures
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {p.name for p in out.written} == {"results.json", "summary.md", "rd.png", "rate_accuracy.png"}
    assert len(doc["results"]) == 2 * 2 * len(peers)
    for r in doc["results"]:
        assert r["bpp"] == pytest.approx(8 * r["bytes"] / (r["height"] * r["width"]))
        budget = metrics.byte_budget(r["target_bpp"], r["height"], r["width"])
        assert (r["bytes"] <= budget) == (r["status"] != "overshoot"), r
    assert doc["codecs"]["jpeg"]["settings"]["subsampling"] == "4:4:4"
    assert "PCHIP" in doc["definitions"]["bd"] and doc["git"]["commit"]
    # A rerun takes every peer result from the cache.
    again = evaluate(images=images, out=tmp_path / "out2", codecs=peers, targets=[0.5, 2.0], cache_path=cache,
                     progress=False)
    assert again.doc["results_from_cache"] == len(doc["results"])


def test_lcodec_quick_run(tmp_path):
    lc = codecs.LcodecCodec("bpp")
    why = lc.unavailable()
    if why is not None:
        pytest.skip(f"lcodec cannot run yet: {why}")
    # The .lc header and hyperprior cost a few hundred bytes: tiny images cannot reach low targets.
    images = _images(tmp_path / "img", sizes=((128, 96), (130, 97)))
    out = evaluate(images=images, out=tmp_path / "out", codecs=["lcodec", "lcodec-1pass", "jpeg"], targets=[1.0, 2.0],
                   cache_path=None, progress=False)
    assert out.exit_code == 0, out.failures
    lc = [r for r in out.doc["results"] if r["codec"] == "lcodec"]
    assert {r["status"] for r in lc} <= {"ok", "unreachable"}  # a RateError is a reported result, not a failure
    ok = [r for r in lc if r["status"] == "ok"]
    assert all(r["bytes"] <= metrics.byte_budget(r["target_bpp"], r["height"], r["width"]) for r in ok)
    assert all(r["message"].startswith("RateError") for r in lc if r["status"] == "unreachable")
    levels = out.doc["lcodec_model"]["levels"]
    assert len([r for r in out.doc["results"] if r["codec"] == "lcodec-1pass"]) == 2 * len(levels)
    assert out.doc["lcodec_model"]["digest"]


def test_bad_input_is_reported_and_the_run_goes_on(tmp_path):
    images = _images(tmp_path / "img", sizes=((64, 48),))
    (images / "broken.png").write_bytes(b"not a png")
    out = evaluate(images=images, out=tmp_path / "out", codecs=["jpeg"], targets=[0.01, 1.0], cache_path=None,
                   progress=False)
    assert out.exit_code == 1
    assert any("broken.png" in f and "unreadable" in f for f in out.failures)
    assert any("over the byte budget" in line for line in out.doc["not_reached"])  # 0.01 bpp is below JPEG's floor
    assert len(out.doc["results"]) == 2  # the good image was measured at both targets

    empty = tmp_path / "empty"
    empty.mkdir()
    out = evaluate(images=empty, out=tmp_path / "out2", codecs=["jpeg"], cache_path=None, progress=False)
    assert out.exit_code == 1 and "no PNG images" in out.failures[0] and not out.written


def test_a_missing_codec_is_skipped_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setattr(codecs.WebP, "unavailable", lambda self: "not installed (test)")
    images = _images(tmp_path / "img", sizes=((64, 48),))
    named = evaluate(images=images, out=tmp_path / "a", codecs=["jpeg", "webp"], targets=[1.0], cache_path=None,
                     progress=False)
    assert named.exit_code == 1 and any("webp skipped" in f for f in named.failures)
    assert [r["codec"] for r in named.doc["results"]] == ["jpeg"]


def test_cli_help_shows_an_example():
    from click.testing import CliRunner

    from kodak_eval.__main__ import main

    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "python -m kodak_eval --quick" in res.output
    res = CliRunner().invoke(main, ["--codecs", "nope"])
    assert res.exit_code == 2 and "unknown codec" in res.output


def test_effort_codecs_follow_the_library_and_run_only_at_three_targets():
    """`lcodec-effort{MAX_EFFORT}` comes right after `lcodec`, a default effort above 0 gets a codec
    of its own, and an effort codec runs only at the targets of EFFORT_TARGETS the run has."""
    import subprocess

    from kodak_eval import bench
    from kodak_eval.evaluate import TARGETS
    from lcodec.api import DEFAULT_EFFORT, MAX_EFFORT

    top = f"lcodec-effort{MAX_EFFORT}"
    assert codecs.ALL_NAMES[:2] == ("lcodec", top) and "lcodec-1pass" in codecs.ALL_NAMES
    assert (f"lcodec-effort{DEFAULT_EFFORT}" in codecs.ALL_NAMES) == (DEFAULT_EFFORT > 0)
    names = subprocess.run([sys.executable, "-c", "import lcodec.api; lcodec.api.DEFAULT_EFFORT = 3; "
                            "from kodak_eval import codecs; print(*codecs.ALL_NAMES)"],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
    assert names.stdout.split()[:4] == ["lcodec", "lcodec-effort3", top, "lcodec-1pass"]

    plain, effort = codecs.make_codecs(["lcodec", top])
    assert (effort.name, effort.mode, effort.effort, plain.effort) == (top, "bpp", MAX_EFFORT, 0)
    assert effort.settings()["effort"] == MAX_EFFORT and effort.settings()["refine_iterations"] > 0
    assert f"effort {MAX_EFFORT}: {effort.settings()['refine_iterations']} refinement steps" in effort.version()
    with pytest.raises(ValueError):
        codecs.LcodecCodec("onepass", effort=1)
    assert bench._tasks(effort, TARGETS, None) == [(0.12, None), (0.5, None), (1.0, None)]
    assert bench._tasks(effort, [2.0, 0.5, 0.25], None) == [(0.5, None)]
    assert bench._tasks(effort, [0.25], None) == []
    assert bench._tasks(plain, TARGETS, None) == [(t, None) for t in TARGETS]


def test_effort_codec_rows_in_the_report(tmp_path, monkeypatch):
    """An effort codec with fewer targets than the others: its files keep the exact-size contract,
    and it has rows in the tables, the BD section and the speed table, and a line saying where it ran
    (JPEG XL's own `effort` setting does not make it one)."""
    from conftest import smooth_rgb
    from kodak_eval import summary
    from lcodec import refine
    from lcodec.api import MAX_EFFORT

    one_step = (0,) + (1,) * MAX_EFFORT  # one step per stage: the plumbing, fast
    monkeypatch.setattr(refine, "HYPER_ITERATIONS", one_step)
    monkeypatch.setattr(refine, "SYMBOL_ITERATIONS", one_step)
    monkeypatch.setattr(refine, "LATENT_ITERATIONS", one_step)
    top = f"lcodec-effort{MAX_EFFORT}"
    images = tmp_path / "img"
    images.mkdir()
    Image.fromarray(smooth_rgb(32, 32)).save(images / "a.png")
    out = evaluate(images=images, out=tmp_path / "out", codecs=["lcodec", top, "jpeg", "jpegxl"],
                   targets=[0.5, 1.0, 2.0], cache_path=None, progress=False)
    assert out.exit_code == 0, out.failures
    doc = out.doc
    mine = [r for r in doc["results"] if r["codec"] == top]
    assert [r["target_bpp"] for r in mine] == [0.5, 1.0] and {r["status"] for r in mine} == {"ok"}
    assert all(r["bytes"] <= metrics.byte_budget(r["target_bpp"], 32, 32) for r in mine)
    settings = doc["codecs"][top]["settings"]
    # the lifting model: two searches for ẑ at each rate tried, then the symbol moves
    assert (settings["effort"], settings["refine_iterations"]) == (MAX_EFFORT, 2 * refine.HYPER_TRIES + 1)
    assert top in summary.LCODEC_MODES
    assert {b["anchor"] for b in doc["bd"] if b["test"] == top} == {"jpeg", "jpegxl"}
    assert {s["codec"] for s in doc["speed"]} == {"lcodec", top, "jpeg", "jpegxl"}
    md = (tmp_path / "out" / "summary.md").read_text()
    label = doc["codecs"][top]["label"]
    psnr = md.split("### PSNR")[1].split("###")[0]
    assert f"| {label} | {mine[0]['psnr']:.2f} | {mine[1]['psnr']:.2f} | – |" in psnr
    assert "runs only at 0.12, 0.5, 1 bpp (in this run: 0.5, 1)" in md and md.count("runs only at") == 1  # not JPEG XL's
    speed = next(s for s in doc["speed"] if s["codec"] == top)
    assert f"| {top} | JPEG (libjpeg-turbo) |" in md and f"| {label} | {speed['encode_s']:.4f} |" in md
    assert {p.name for p in out.written} >= {"rd.png", "rate_accuracy.png"}
    # None of its targets in the run: no rows, a note, and the report is still written.
    none = evaluate(images=images, out=tmp_path / "none", codecs=[top, "jpeg"], targets=[2.0], cache_path=None,
                    progress=False)
    assert none.exit_code == 0 and f"{top} not measured: it runs only at 0.12, 0.5, 1 bpp" in none.doc["notes"]
    assert "(in this run: none)" in (tmp_path / "none" / "summary.md").read_text()


def test_speed_reports_each_effort(tmp_path):
    """`python -m kodak_eval.speed --efforts 0,1`: the encode at --bpp is timed at each effort (here
    with the tiny model 0), and the JSON and Markdown give each level's median time."""
    import argparse
    import os

    from kodak_eval import speed
    from lcodec import engine, refine
    from lcodec.models.registry import MODELS

    assert speed._efforts("9,0,1,1") == [0, 1, 9]
    for bad in ("10", "-1", "x", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            speed._efforts(bad)
    with pytest.raises(SystemExit):
        speed.main(["--efforts", "10"])
    if not speed.KODAK.is_dir():
        pytest.skip(f"needs the Kodak images at {os.path.normpath(speed.KODAK)}")
    tiny = tmp_path / "tiny.pt"
    tiny.write_bytes(MODELS[0].path.read_bytes())
    args = argparse.Namespace(bpp=1.5, rate=None, runs=1, images=1, model=0, weights=tiny, choice=False,
                              efforts=[0, 1], threads=0, load_start=os.getloadavg())  # model 0 reaches 1.5 bpp
    files = tmp_path / "files"
    files.mkdir()
    enc = speed.child("encode", args, files)
    dec = speed.child("decode", args, files)
    s = speed.summarize(enc, dec, args, None)
    zero, one = s["encode_by_effort"]
    steps = refine.iterations(1, engine.Weights.load(tiny).model)
    assert (zero["effort"], zero["iterations"], one["effort"], one["iterations"]) == (0, 0, 1, steps)
    assert zero["median_s"] == s["encode_at_bpp"]["median_s"] and one["median_s"] > 0
    assert zero["reached"] == one["reached"] == 1 and one["median_bpp"] <= 1.5
    report = speed.markdown(s)
    assert f"| 1 | {steps} | {one['median_s']:.3f} |" in report and "by effort" in report
    json.dumps(s)  # the JSON report


def test_latent_bound_grows_with_the_width_and_is_exact_at_full_width(tmp_path):
    from kodak_eval.latent_bound import pca_bound

    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 48), Image.BILINEAR).save(p)  # 12 smooth blocks each
        paths.append(p)
    bound = pca_bound(paths[:3], paths[3:], [4, 16, 64, 768])
    assert bound[4] < bound[16] < bound[64]
    assert bound[768] > 100  # every component kept: only float round-off is left


def test_speed_times_the_weights_file_it_is_given(tmp_path):
    """`python -m kodak_eval.speed --weights F` codes with F, not with the installed weights of
    --model: the files it times carry --model's id and F's digest and decode with F, the report
    names F and its SHA-256, and the timing shim is gone once a phase ends."""
    import argparse
    import os

    from kodak_eval import speed
    from lcodec import engine
    from lcodec.bitstream import container
    from lcodec.models.registry import DEFAULT_MODEL_ID, MODELS

    if not speed.KODAK.is_dir():
        pytest.skip(f"needs the Kodak images at {os.path.normpath(speed.KODAK)}")
    interim = tmp_path / "interim.pt"  # the tiny model 0, under a name the model table does not know
    interim.write_bytes(MODELS[0].path.read_bytes())
    args = argparse.Namespace(bpp=1.0, rate=None, runs=1, images=1, model=DEFAULT_MODEL_ID, weights=interim, choice=False,
                              efforts=[0], threads=0, load_start=os.getloadavg())
    files = tmp_path / "files"
    files.mkdir()
    estimate_bytes = engine.Encoder.estimate_bytes
    enc = speed.child("encode", args, files)
    assert engine.Encoder.estimate_bytes is estimate_bytes
    dec = speed.child("decode", args, files)

    one_pass = (files / "kodim01.one_pass.lc").read_bytes()
    header = container.read_header(one_pass)
    assert header.model_id == DEFAULT_MODEL_ID and header.weights_digest == MODELS[0].digest4
    rgb = np.asarray(Image.open(speed.KODAK / "kodim01.png").convert("RGB"))
    tiny = engine.Weights.load(interim)
    assert one_pass == engine.encode_array(rgb, "RGB", rate=enc["one_pass_rate"], model_id=DEFAULT_MODEL_ID,
                                           weights=tiny).data
    assert enc["rows"][0]["one_pass"]["calls"]["g_a"] == 1 and enc["rows"][0]["one_pass"]["g_a"] > 0
    assert dec["rows"][0]["decode"]["psnr"] > 15 and dec["rows"][0]["decode"]["calls"]["g_s"] == 1
    report = speed.markdown(speed.summarize(enc, dec, args, None))
    assert str(interim) in report and MODELS[0].sha256 in report


def test_model_table_measures_real_files(tmp_path):
    """`python -m kodak_eval.model_table`: one-pass rates are real file sizes, exact rates stay under
    the target; `--weights F` measures F (here model 0's file under another name) under `--model-id`'s id."""
    from conftest import smooth_rgb
    from kodak_eval import model_table
    from lcodec import engine
    from lcodec.models.registry import MODELS

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(smooth_rgb(176, 192)).save(images / "a.png")  # MS-SSIM needs sides over 160
    result = model_table.measure(images, model_id=0)
    assert result["model"]["model_id"] == 0 and result["model"]["weights"] == "installed" and result["images"] == 1
    assert [r["target"] for r in result["rows"]] == result["model"]["levels"]
    img = np.asarray(Image.open(images / "a.png"))
    one_pass = 8 * len(engine.encode_array(img, "RGB", rate=0.0, model_id=0).data) / (176 * 192)
    assert result["rows"][0]["one_pass_bpp"]["mean"] == pytest.approx(one_pass)
    for row in result["rows"]:
        if row["exact"] is not None:
            assert row["exact"]["bpp"] <= row["target"]

    interim = tmp_path / "interim.pt"
    interim.write_bytes(MODELS[0].path.read_bytes())
    out = tmp_path / "table.json"
    model_table.main(["--kodak", str(images), "--weights", str(interim), "--model-id", "6", "--out", str(out)])
    other = json.loads(out.read_text())
    assert other["model"] == json.loads(json.dumps(result["model"])) | {"name": "interim.pt", "model_id": 6,
                                                                          "weights": str(interim)}
    assert other["rows"] == json.loads(json.dumps(result["rows"]))  # the same weights: the same numbers
    assert out.with_suffix(".md").read_text() == model_table.markdown(result) + "\n"
