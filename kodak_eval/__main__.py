"""`python -m kodak_eval`: parse options, call `evaluate()`, report, set the exit status."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .codecs import ALL_NAMES
from .evaluate import DEFAULT_CACHE, DEFAULT_IMAGES, DEFAULT_OUT, DEFAULT_PUBLISHED, DEFAULT_QUICK_OUT, TARGETS, evaluate


def _floats(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


def _names(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in ALL_NAMES]
    if unknown:
        raise click.BadParameter(f"unknown codec(s) {', '.join(unknown)}; known: {', '.join(ALL_NAMES)}")
    return names


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--images", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_IMAGES, show_default=True,
              help="Folder of PNG images (any size).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help=f"Results folder [default: {DEFAULT_OUT}, or {DEFAULT_QUICK_OUT} with --quick].")
@click.option("--codecs", callback=_names, default=None,
              help=f"Comma-separated subset of: {', '.join(ALL_NAMES)} [default: all that are installed]. "
                   "A codec named here that cannot run makes the exit status non-zero.")
@click.option("--bpp", "targets", callback=_floats, default=None,
              help=f"Comma-separated target bpp [default: {','.join(f'{t:g}' for t in TARGETS)}].")
@click.option("--quick", is_flag=True, help="Smoke run: the first 3 images at 0.12, 0.5 and 1.0 bpp.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images.")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path, dir_okay=False), default=DEFAULT_CACHE,
              show_default=True, help="Peer-result cache (JSON lines); lcodec is never cached.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the peer cache.")
@click.option("--published", "published_path", type=click.Path(path_type=Path, dir_okay=False), default=DEFAULT_PUBLISHED,
              show_default=True, help="Published reference curves drawn dashed in the RD plot.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads each codec may use (torch.set_num_threads for lcodec).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def main(images: Path, out: Path | None, codecs: list[str] | None, targets: list[float] | None, quick: bool,
         limit: int | None, cache_path: Path, no_cache: bool, published_path: Path, threads: int, no_progress: bool) -> None:
    """Measure lcodec and peer codecs on real files: RD plots, rate accuracy, speed.

    \b
    Examples:
      python -m kodak_eval                      # everything, Kodak, 8 targets
      python -m kodak_eval --quick --codecs jpeg,webp
      python -m kodak_eval --images ~/photos-4k --bpp 0.25,0.5 --out /tmp/r
    """
    outcome = evaluate(images=images, out=out, codecs=codecs, targets=targets, quick=quick, limit=limit,
                       cache_path=None if no_cache else cache_path, published_path=published_path, threads=threads,
                       progress=not no_progress, argv=sys.argv[1:])
    for line in outcome.warnings:
        click.echo(f"warning: {line}", err=True)
    if outcome.doc is not None:
        for line in outcome.doc["not_reached"]:
            click.echo(f"not reached: {line}", err=True)
    for line in outcome.failures:
        click.echo(f"error: {line}", err=True)
    for path in outcome.written:
        click.echo(f"wrote {path}")
    sys.exit(outcome.exit_code)


if __name__ == "__main__":
    main()
