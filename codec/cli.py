"""The ``lcodec`` command line: option parsing and messages over `lcodec.api`.

Every `LcodecError` becomes one ``Error: <message>`` line on stderr and exit
status 1 (usage errors: 2, as click does); Ctrl-C exits with 130 and leaves no
partial file. With several inputs, a failed one is reported and the others
still run; the exit status is 1 if any failed. The library's messages name its
keyword arguments (``force=True``, ``max_pixels=``); `_in_cli_words` turns
those into the options here.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import click

from . import __version__, api
from .bitstream.container import DEFAULT_MAX_PIXELS, RATE_SCALE, Header
from .errors import LcodecError
from .metadata import describe_icc
from .models.registry import MODELS  # the model table only: no torch

STDIO = "-"
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Turns our errors into one clean line and Ctrl-C into exit status 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LcodecError as e:
            raise click.ClickException(str(_in_cli_words(e))) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="lcodec")
def main() -> None:
    """lcodec: a learned image codec that hits the file size you ask for.

    \b
    Examples:
      lcodec encode photo.png --bpp 0.5       # photo.lc, at most 0.5 bits per pixel
      lcodec encode *.png --size 20000 -o out/ -j 2   # out/ is created if missing
      lcodec decode photo.lc -o decoded.png
      lcodec info photo.lc

    Run "lcodec COMMAND --help" for each command's options.
    """


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="IN...")
@click.option("--bpp", type=click.FloatRange(min=0, min_open=True), callback=_finite, metavar="B",
              help="Largest file as bits per pixel: 8 x file bytes (header included) / (width x height).")
@click.option("--size", type=click.IntRange(min=1), metavar="BYTES", help="Largest file size in bytes.")
@click.option("-o", "--output", metavar="OUT",
              help="Output file, directory (a name ending in / is created if missing), or - for stdout. "
                   "Default: each input with the suffix .lc.")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              metavar="N", help="Refuse images with more pixels than this (read from the image's header).")
@click.option("-e", "--effort", type=click.IntRange(0, api.MAX_EFFORT), default=api.DEFAULT_EFFORT,
              show_default=True, metavar="E",
              help=f"0-{api.MAX_EFFORT}: encode time spent for a better picture at the same size "
                   "(searches for better probability tables for the picture; every lcodec decodes the result).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Encode several inputs in N worker processes.")
@click.option("--strip-metadata", is_flag=True,
              help="Leave out the input's EXIF and XMP (camera, place, date...). The ICC colour profile is kept.")
def encode(inputs: tuple[str, ...], bpp: float | None, size: int | None, output: str | None, force: bool,
           max_pixels: int, effort: int, jobs: int, strip_metadata: bool) -> None:
    """Encode images to .lc files no larger than --bpp or --size asks.

    Give exactly one of --bpp and --size. Inputs are PNG, JPEG, TIFF, WebP or
    anything else Pillow reads, in RGB or grayscale (also 16-bit, palette,
    CMYK), with or without alpha. Transparency is kept exactly, and the ICC
    profile, EXIF and XMP are kept unless --strip-metadata; they count in the
    size. IN may be - to read stdin.

    \b
    Examples:
      lcodec encode photo.png --bpp 0.5            # writes photo.lc
      lcodec encode photo.png --bpp 0.5 --effort 9 # slower, better at the same size
      lcodec encode photo.jpg --bpp 0.5 --strip-metadata   # no EXIF or XMP in photo.lc
      lcodec encode a.png b.jpg --size 20000 -o out/ -j 2
      lcodec encode huge.tif --bpp 0.1 --max-pixels 100000000
      cat photo.png | lcodec encode - --bpp 0.25 -o - > photo.lc
    """
    if (bpp is None) == (size is None):
        raise click.UsageError("give exactly one of --bpp and --size")
    target = f"target {bpp:g}" if bpp is not None else f"target {size:,} bytes"
    plan = _plan(inputs, output, ".lc")

    def report(src: str, dst: str, r: api.EncodedFile) -> str:
        kept = f"; {', '.join(r.kept)}: {r.kept_bytes:,} bytes" if r.kept else ""
        return f"{_shown(src, 'in')} -> {_shown(dst, 'out')}: {r.size:,} bytes, {r.bpp:.4f} bpp ({target}{kept})"

    options = dict(bpp=bpp, size=size, force=force, max_pixels=max_pixels, effort=effort,
                   strip_metadata=strip_metadata)
    if effort and len(plan) == 1:
        with _steps() as bar:  # one file: a bar over its refinement steps
            _run(plan, _encode_one, options | {"progress": bar}, report, jobs)
    else:
        _run(plan, _encode_one, options, report, jobs)


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="IN.lc...")
@click.option("-o", "--output", metavar="OUT",
              help="Output image (format by extension), directory (a name ending in / is created if missing), "
                   "or - for PNG on stdout. Default: each input with the suffix .png.")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              metavar="N", help="Refuse files whose header declares more pixels than this.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Decode several inputs in N worker processes.")
@click.option("--scale", type=click.Choice(["1", "1/2", "1/4", "1/8", "1/16"]), default="1", show_default=True,
              help="Decode a smaller picture, ceil(width x scale) x ceil(height x scale), in a fraction of the "
                   "time: only the coarse wavelet levels are decoded.")
def decode(inputs: tuple[str, ...], output: str | None, force: bool, max_pixels: int, jobs: int, scale: str) -> None:
    """Decode .lc files to PNG or other image files.

    The output's extension picks its format: .png (the default), .tif, .bmp
    or any other that Pillow writes; a lossy one (.jpg, .webp...) compresses
    the decoded picture again at Pillow's default settings, and a warning says
    so. The file's ICC profile, EXIF and XMP go into PNG, JPEG, WebP, TIFF
    and AVIF outputs (a warning names what another format leaves out); a
    picture with alpha cannot be written as JPEG. An output name without an
    extension is an error; stdout gets PNG. A file that does not decode
    completely leaves no output behind. IN may be - to read stdin.

    \b
    Examples:
      lcodec decode photo.lc                       # writes photo.png
      lcodec decode photo.lc -o photo.webp --force
      lcodec decode photo.lc --scale 1/8 -o thumb.png   # 1/8 of the width and height, fast
      lcodec decode *.lc -o decoded/
      lcodec decode - -o - < photo.lc > photo.png
    """
    plan = _plan(inputs, output, ".png")

    def report(src: str, dst: str, r: api.DecodedFile) -> str:
        return f"{_shown(src, 'in')} -> {_shown(dst, 'out')}: {r.width}x{r.height} {r.mode}, {r.format}"

    _run(plan, _decode_one, dict(force=force, max_pixels=max_pixels, scale=scale), report, jobs)


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="FILE.lc...")
@click.pass_context
def info(ctx: click.Context, inputs: tuple[str, ...]) -> None:
    """Show what the headers of .lc files say (fast: decodes no pixels).

    \b
    Example:
      lcodec info photo.lc
    """
    failed = False
    for src in inputs:
        try:
            if src == STDIO:
                data = _stdin_bytes()
                header, size = api.read_header(data), len(data)
            else:
                header, size = api.read_header(src), os.path.getsize(src)
        except LcodecError as e:
            click.echo(f"Error: {e}", err=True)
            failed = True
            continue
        click.echo(_describe(_shown(src, "in"), header, size))
    if failed:
        ctx.exit(1)


def _describe(name: str, h: Header, size: int) -> str:
    entry = MODELS.get(h.model_id)
    model = f"id {h.model_id}, weights digest {h.weights_digest.hex()}"
    if entry is None:
        model += " (a model this lcodec does not know; a newer one may)"
    elif entry.digest4 != h.weights_digest:
        model = f"{entry.name} ({model}; the installed weights are {entry.digest4.hex()}: cannot decode)"
    else:
        model = f"{entry.name} ({model})"
    alpha = h.chunk(b"ALPH")
    lines = [name,
             f"  size:            {size:,} bytes",
             f"  dimensions:      {h.width}x{h.height}",
             f"  mode:            {h.mode + 'A' if alpha is not None else h.mode}",
             f"  bits per pixel:  {8 * size / h.pixels:.4f}",
             f"  model:           {model}",
             f"  format version:  {h.version}",
             f"  rate parameter:  {h.rate_q / RATE_SCALE:.4f} (stored as {h.rate_q}, q x {RATE_SCALE})"]
    if alpha is not None:
        lines.append(f"  alpha:           lossless WebP, {len(alpha):,} bytes")
    icc = h.chunk(b"ICCP")
    if icc is not None:
        what = describe_icc(icc)
        lines.append(f"  ICC profile:     {len(icc):,} bytes" + (f" ({what})" if what else ""))
    for label, tag in (("EXIF", b"EXIF"), ("XMP", b"XMP ")):
        data = h.chunk(tag)
        if data is not None:
            lines.append(f"  {label + ':':<17}{len(data):,} bytes")
    if icc is None and h.chunk(b"EXIF") is None and h.chunk(b"XMP ") is None:
        lines.append("  metadata:        none (no ICC profile: the colours are sRGB)")
    return "\n".join(lines)


# -- the work, one file at a time (top-level functions: worker processes import them) ------------


def _encode_one(src: str, dst: str, **options) -> api.EncodedFile:
    source = _stdin_file() if src == STDIO else src
    return api.encode_file(source, _stdout() if dst == STDIO else dst, **options)


def _decode_one(src: str, dst: str, **options) -> api.DecodedFile:
    source = _stdin_file() if src == STDIO else src
    return api.decode_file(source, _stdout() if dst == STDIO else dst, **options)


def _plan(inputs: Sequence[str], output: str | None, suffix: str) -> list[tuple[str, str]]:
    """(input, output) pairs, or a usage error for an -o that cannot serve these inputs.

    An -o ending in / names a directory, made (with its parents) if missing,
    once every other check has passed.
    """
    if STDIO in inputs and len(inputs) > 1:
        raise click.UsageError("- (stdin) must be the only input")
    make_dir = output is not None and output.endswith(("/", os.sep))
    if output is not None and output != STDIO and (make_dir or Path(output).is_dir()):
        if STDIO in inputs:
            raise click.UsageError("stdin has no file name to put in a directory: give -o FILE or -o -")
        pairs = [(src, str(Path(output) / (Path(src).stem + suffix))) for src in inputs]
    elif output is not None:
        if len(inputs) > 1:
            raise click.UsageError(f"with several inputs, -o must be a directory: {output} is not one "
                                   f"(end it with / to create it)")
        pairs = [(inputs[0], output)]
    else:
        pairs = [(src, STDIO if src == STDIO else str(Path(src).with_suffix(suffix))) for src in inputs]
    seen: dict[str, str] = {}
    for src, dst in pairs:
        if dst in seen:
            raise click.UsageError(f"{seen[dst]} and {src} would both be written to {dst}")
        seen[dst] = src
    if any(dst == STDIO for _, dst in pairs) and _stdout().isatty():
        raise click.UsageError("refusing to write binary data to a terminal: redirect stdout or give -o FILE")
    if make_dir:
        try:
            os.makedirs(output, exist_ok=True)
        except OSError as e:
            raise click.ClickException(f"cannot create the directory {output}: {e.strerror or e}") from None
    return pairs


def _run(plan: list[tuple[str, str]], work: Callable, options: dict, report: Callable[[str, str, object], str],
         jobs: int) -> None:
    """Do `work(src, dst, **options)` for each pair, report each result, exit 1 if any failed."""
    to_stdout = any(dst == STDIO for _, dst in plan)
    bar = _progress(len(plan))

    def say(line: str, err: bool) -> None:
        if bar is None:
            click.echo(line, err=err)
        else:  # above the bar, which is then drawn again
            bar.write(line, file=sys.stderr if err else sys.stdout)

    failed = False
    try:
        for src, dst, outcome in _outcomes(plan, work, options, jobs):
            if isinstance(outcome, LcodecError):
                failed = True
                say(f"Error: {outcome}", err=True)
            else:
                if getattr(outcome, "warning", None):
                    say(f"Warning: {_shown(src, 'in')}: {outcome.warning}", err=True)
                say(report(src, dst, outcome), err=to_stdout)  # keep a piped stdout clean
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    if failed:
        click.get_current_context().exit(1)


def _outcomes(plan: list[tuple[str, str]], work: Callable, options: dict, jobs: int) -> Iterator[tuple]:
    """(src, dst, result or LcodecError) per pair: in order here, as they finish with workers."""
    if jobs == 1 or len(plan) == 1:
        for src, dst in plan:
            yield src, dst, _attempt(work, src, dst, options)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")  # a fork of a process that has run torch can deadlock
    stop = context.Event()  # set on Ctrl-C: workers then skip the files queued to them
    with ProcessPoolExecutor(min(jobs, len(plan)), mp_context=context, initializer=_start_worker,
                             initargs=(stop,)) as pool:
        futures = {pool.submit(_attempt_in_worker, work, src, dst, options): (src, dst) for src, dst in plan}
        try:
            for future in as_completed(futures):
                yield (*futures[future], future.result())
        except BaseException:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _attempt(work: Callable, src: str, dst: str, options: dict):
    try:
        return work(src, dst, **options)
    except LcodecError as e:
        return _in_cli_words(e)


# The library's advice names its keyword arguments; here the same advice names the options.
_CLI_WORDS = (
    (re.compile(r"\bpass force=True\b"), "use --force"),
    (re.compile(r"\bpass max_pixels=(\d+)"), r"give --max-pixels \1"),
    (re.compile(r"\bpass a larger max_pixels\b"), "give a larger --max-pixels"),
    (re.compile(r"\bpass strip_metadata=True\b"), "give --strip-metadata"),
)


def _in_cli_words(e: LcodecError) -> LcodecError:
    """`e` (same type) with the library's advice worded for the command line."""
    message = str(e)
    for pattern, words in _CLI_WORDS:
        message = pattern.sub(words, message)
    return e if message == str(e) else type(e)(message)


_stop = None  # in a worker: the main process's Ctrl-C event


def _start_worker(stop) -> None:
    """Each worker imports torch once and uses one thread (the workers share the cores).

    Ctrl-C reaches every process of the terminal's group; a worker only lets it
    interrupt a file (see `_attempt_in_worker`): idle or starting up, it would
    die with a traceback instead.
    """
    import signal

    global _stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop = stop
    import torch

    from . import engine  # noqa: F401  (the import is the point: once per worker)

    torch.set_num_threads(1)


def _attempt_in_worker(work: Callable, src: str, dst: str, options: dict):
    import signal

    if _stop.is_set():  # Ctrl-C came while this file waited in the queue
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)  # interrupted, it removes its temporary file
    try:
        return _attempt(work, src, dst, options)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _progress(total: int):
    """A progress bar on stderr for several files (tqdm hides it when stderr is not a terminal)."""
    if total < 2:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", file=sys.stderr, disable=None, leave=False)


@contextlib.contextmanager
def _steps() -> Iterator:
    """A progress bar on stderr over one encode's refinement steps (hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    bar = tqdm(total=0, unit="step", desc="refining", file=sys.stderr, disable=None, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _shown(name: str, direction: str) -> str:
    return name if name != STDIO else ("<stdin>" if direction == "in" else "<stdout>")


def _stdin_bytes() -> bytes:
    return sys.stdin.buffer.read()


def _stdin_file() -> BinaryIO:
    data = io.BytesIO(_stdin_bytes())  # seekable, as Pillow wants
    data.name = "<stdin>"
    return data


def _stdout() -> BinaryIO:
    return sys.stdout.buffer
