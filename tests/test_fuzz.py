"""A fast, seeded subset of the decoder fuzzing in `fuzz_lc.py` (run that script for 10,000+ cases).

Claim: every hostile input ends in the `LcodecError` that SPEC.md's ordered checks
name, or in CorruptFileError / a valid image once the payload is reached; the
engine and the API agree; nothing raises anything else or takes seconds.
"""

from __future__ import annotations

import collections
import time

import pytest

import fuzz_lc

CASES = 200
SEED = 20240601


@pytest.fixture(scope="module", autouse=True)
def archived_weights():
    """The corpus holds the golden files of archived models too: their weights where a decoder
    looks for them (the harness's own main does the same)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LCODEC_WEIGHTS_PATH", str(fuzz_lc.ARCHIVE))
        yield


@pytest.fixture(scope="module")
def corpus():
    return fuzz_lc.build_corpus()


@pytest.fixture(scope="module")
def reference(corpus):
    return {s.data: fuzz_lc.decode_once(s.data, fuzz_lc.DEFAULT_MAX_PIXELS)["pixels_crc"] for s in corpus}


def test_corpus_files_decode(corpus, reference):
    assert len(corpus) >= 10
    assert all(crc is not None for crc in reference.values())


def test_seeded_cases_fail_cleanly_and_as_the_spec_says(corpus, reference):
    verdicts, reasons = collections.Counter(), collections.Counter()
    slowest = 0.0
    for i in range(CASES):
        case = fuzz_lc.make_case(SEED, i, corpus)
        start = time.perf_counter()
        result = fuzz_lc.decode_once(case.data, case.max_pixels)
        slowest = max(slowest, time.perf_counter() - start)
        verdict = fuzz_lc.judge(case, result, reference)
        verdicts[verdict] += 1
        reasons[fuzz_lc.reason(result["outcome"], result["detail"])] += 1
        assert verdict == "ok", (i, case.cls, verdict, result["problem"], result["detail"][-1500:])
    assert slowest < 5.0
    # The CRC-fixed classes must get past the container into the payload decoder, both ways.
    assert sum(n for r, n in reasons.items() if "/payload:" in r) >= CASES // 10
    # Some cases must still decode to a picture (a mutation the format tolerates, checked against the
    # reference): 9-16 of 200 with the seeds and corpora tried, so at least 5.
    assert reasons[fuzz_lc.IMAGE] >= 5


def test_damaged_chunks_and_alpha_fail_cleanly_and_as_the_spec_says(corpus, reference):
    """Version 2's chunk block: the framing checks (SPEC.md check 7) and the alpha chunk's decoder (check 12)."""
    reasons = collections.Counter()
    for i in range(60):
        case = fuzz_lc.make_case(SEED, i, corpus, only="chunks-crc")
        result = fuzz_lc.decode_once(case.data, case.max_pixels)
        verdict = fuzz_lc.judge(case, result, reference)
        reasons[fuzz_lc.reason(result["outcome"], result["detail"])] += 1
        assert verdict == "ok", (i, verdict, result["problem"], result["detail"][-1500:])
    assert reasons["CorruptFileError/chunks"] >= 5 and reasons["CorruptFileError/alpha"] >= 5, reasons
    assert reasons[fuzz_lc.IMAGE] >= 1, reasons


def test_corpus_files_with_chunks_give_their_metadata_and_alpha_back(corpus):
    chunked = [s for s in corpus if s.name.endswith("-chunks")]
    assert len(chunked) >= 2
    for seed in chunked:
        result = fuzz_lc.decode_once(seed.data, fuzz_lc.DEFAULT_MAX_PIXELS)
        assert result["outcome"] == fuzz_lc.IMAGE and result["problem"] is None, result


def test_cases_are_reproducible(corpus):
    assert fuzz_lc.make_case(SEED, 17, corpus) == fuzz_lc.make_case(SEED, 17, corpus)
    assert fuzz_lc.make_case(SEED, 17, corpus) != fuzz_lc.make_case(SEED + 1, 17, corpus)


def test_spec_oracle_names_each_check():
    golden = (fuzz_lc.GOLDEN / "v1_rgb_64x48.lc").read_bytes()
    allowed = lambda data, cap=fuzz_lc.DEFAULT_MAX_PIXELS: fuzz_lc.spec_outcome(data, cap)  # noqa: E731
    assert allowed(golden) == {"CorruptFileError", fuzz_lc.IMAGE}
    assert allowed(b"GIF89a") == {"NotAnLcFileError"}
    assert allowed(b"lco") == allowed(b"") == allowed(golden[:20]) == {"CorruptFileError"}
    assert allowed(fuzz_lc.replace_header(golden, version=3)) == {"UnsupportedVersionError"}
    assert allowed(fuzz_lc.with_crc(fuzz_lc.replace_header(golden, version=2)[:-4])) == {"CorruptFileError", fuzz_lc.IMAGE}
    assert allowed(golden[:-1] + bytes([golden[-1] ^ 1])) == {"CorruptFileError"}
    assert allowed(golden, 64 * 48 - 1) == {"ImageTooLargeError"}
    chunked = fuzz_lc.with_chunks(golden, [(b"ICCP", b"icc")])
    assert allowed(chunked) == {"CorruptFileError", fuzz_lc.IMAGE}
    assert allowed(fuzz_lc.with_chunks(golden, [(b"ICCP", b"a"), (b"ICCP", b"b")])) == {"CorruptFileError"}
    assert allowed(fuzz_lc.with_chunks(golden, [(b"JUNK", b"a")])) == {"CorruptFileError"}
    assert allowed(fuzz_lc.with_crc(chunked[:4] + b"\x01" + chunked[5:-4])) == {"CorruptFileError"}  # flag in v1
    assert allowed(chunked, 64 * 48 - 1) == {"ImageTooLargeError"}
    assert allowed(fuzz_lc.with_crc(fuzz_lc.replace_header(golden, model_id=77)[:-4])) == {"ModelMismatchError"}


def test_a_planted_bug_is_caught(corpus, reference, monkeypatch):
    """The harness itself: an exception that is not a LcodecError is a crash, not a pass."""
    from lcodec.bitstream import range_coder

    def broken_finish(self):
        raise IndexError("planted")

    monkeypatch.setattr(range_coder.Decoder, "finish", broken_finish)
    case = fuzz_lc.Case(0, "clean", corpus[0].data, fuzz_lc.FUZZ_MAX_PIXELS)
    assert fuzz_lc.judge(case, fuzz_lc.decode_once(case.data, case.max_pixels), reference) == "crash:IndexError"


def test_watchdog_reports_a_hang_and_recovers():
    """The harness itself: a case over the time budget is a 'hang', and the next case still runs."""
    from lcodec.models.registry import DEFAULT_MODEL_ID, MODELS

    # Version 2: a model with a subband context refuses a version-1 file at once, which is no hang.
    bomb = fuzz_lc.with_crc(fuzz_lc.HEADER.pack(b"lcod", 2, DEFAULT_MODEL_ID, MODELS[DEFAULT_MODEL_ID].digest4,
                                                4096, 4096, 1, 0))
    watchdog = fuzz_lc.Watchdog(timeout=0.05, max_rss_mb=4096, address_space_mb=0)
    try:
        assert watchdog.run(bomb, fuzz_lc.DEFAULT_MAX_PIXELS)["outcome"] == "hang"
        watchdog.timeout = 60
        assert watchdog.run(b"not an lc file", 100)["outcome"] == "NotAnLcFileError"
    finally:
        watchdog.close()
