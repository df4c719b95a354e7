"""One benchmark run, from a folder of images to a results folder.

`evaluate()` is what `python -m kodak_eval` calls; it never raises for bad
input or a missing codec, it records them and says so in `Outcome.failures`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import bench, report
from .codecs import ALL_NAMES, Codec, LcodecCodec, make_codecs

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "kodak"
DEFAULT_PUBLISHED = REPO.parent / "shared" / "reference" / "kodak_published.json"
DEFAULT_OUT = REPO / "kodak_eval" / "results"
DEFAULT_QUICK_OUT = REPO / "kodak_eval" / "results-quick"
DEFAULT_CACHE = REPO / "kodak_eval" / "cache" / "peers.jsonl"
TARGETS = (0.06, 0.12, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
QUICK_TARGETS = (0.12, 0.5, 1.0)
QUICK_IMAGES = 3


@dataclass
class Outcome:
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    doc: dict | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0


def nearest_levels(levels: Sequence[float], targets: Sequence[float]) -> list[int]:
    """Indices of the trained levels closest (in log bpp) to each target, without repeats."""
    import math

    return sorted({min(range(len(levels)), key=lambda i: abs(math.log(levels[i] / t))) for t in targets})


def evaluate(
    images: Path = DEFAULT_IMAGES,
    out: Path | None = None,
    codecs: Sequence[str] | None = None,
    targets: Sequence[float] | None = None,
    quick: bool = False,
    limit: int | None = None,
    cache_path: Path | None = DEFAULT_CACHE,
    published_path: Path | None = DEFAULT_PUBLISHED,
    threads: int = 1,
    progress: bool = True,
    argv: Sequence[str] = (),
) -> Outcome:
    """Run the benchmark and write the results folder. `codecs=None` means every codec
    that can run here (a missing one is a warning); naming a codec makes its absence a failure."""
    result = Outcome()
    explicit = codecs is not None
    targets = sorted(targets if targets else (QUICK_TARGETS if quick else TARGETS))
    if out is None:
        out = DEFAULT_QUICK_OUT if quick else DEFAULT_OUT
    if any(t <= 0 for t in targets):
        result.failures.append(f"targets must be positive bpp, got {targets}")
        return result

    if not images.is_dir():
        result.failures.append(f"image folder {images} does not exist")
        return result
    paths = bench.list_images(images)
    if quick:
        paths = paths[:QUICK_IMAGES]
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        result.failures.append(f"no PNG images in {images}")
        return result

    chosen: list[Codec] = []
    skipped: dict[str, str] = {}
    for codec in make_codecs(list(codecs) if explicit else list(ALL_NAMES), threads):
        why = codec.unavailable()
        if why is None:
            chosen.append(codec)
        else:
            skipped[codec.name] = why
            (result.failures if explicit else result.warnings).append(f"{codec.name} skipped: {why}")
    if not chosen:
        result.failures.append("no codec can run")
        return result

    onepass_levels = None
    lc = next((c for c in chosen if isinstance(c, LcodecCodec) and c.mode == "onepass"), None)
    if quick and lc is not None:
        onepass_levels = nearest_levels(lc.levels(), targets)

    published = None
    if published_path is not None:
        try:
            published = json.loads(published_path.read_text())
        except (OSError, ValueError) as exc:
            result.warnings.append(f"published reference curves not drawn: {published_path}: {exc}")

    log = bench.run(paths, chosen, targets, bench.Cache(cache_path), progress=progress, onepass_levels=onepass_levels,
                    threads=threads)
    log.skipped = skipped
    if not log.images:
        log.failures.append(f"none of the {len(paths)} images in {images} could be read")
    log.notes = [*result.warnings, *log.notes]
    result.failures += log.failures
    if log.results:
        doc = report.build(log, chosen, targets=targets, images_dir=images, repo=REPO, threads=threads, argv=argv,
                           published=published)
        doc["failures"] = [*result.failures]
        result.written = report.write(doc, published, out)
        result.failures = doc["failures"]
        result.doc = doc
    return result
