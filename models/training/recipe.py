"""Make a model from a recipe: its stages in order, each with its settings and its input.

    python -m lcodec.models.training.recipe models/recipes/lift-97-128-v5.toml --out runs/v5
    python -m lcodec.models.training.recipe models/recipes/lift-97-128-v5.toml --out runs/v5 --dry-run
    python -m lcodec.models.training.recipe models/recipes/lift-97-128-v5.toml --out runs/q --quick

A recipe is a TOML file (`models/recipes/`):

    model = "lift-97-128-v5"        # the name of what it makes (and `model_id`, once registered)
    extends = "other.toml"          # optional: that recipe's stages (and data, shared) come first
    data = "../shared/data/train"   # the training images (relative to the working directory)

    [shared.train]                  # settings every stage of a kind starts from
    arch = "lifting"

    [[stages]]
    name = "entropy-rate"           # the stage's folder, <out>/entropy-rate/
    kind = "train"                  # how it runs: one of `KINDS`
    input = "lift"                  # an earlier stage (its output) or a file; none: from scratch
    resume = false                  # train only: continue the input's run instead of --init from it
    [stages.settings]               # the options of the kind's command, without the dashes;
    steps = 5000                    # true is a flag, a list gives several values
    lr = 3e-4

Each stage is one run of a single-stage command (`python -m lcodec.models.training.train`,
`fit_levels`, `freeze`, `postfilter`, `context`, `z_tables`, `widen`; `--dry-run` prints them) into its own folder, where
`stage.json` records its settings and its input's SHA-256, and its output's once it has finished.
Running the same command again skips the finished stages and continues at the first unfinished
one; a training stage continues from its last checkpoint. A folder begun with other settings or
from another input is refused rather than mixed. The last stage's output is copied to
`<out>/<model>.pt`.

`--quick` runs every stage for a thousandth of its steps (at least one) on a few small crops
(`QUICK`), without validation: it checks a recipe and the tools end to end in seconds, and its
model is worth nothing.

A new kind of stage is one `StageKind` in `KINDS`: the module whose `main(argv)` runs it, the
file it leaves in its folder, the command line for a stage, and what `--quick` changes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shlex
import shutil
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..registry import sha256_file

RECORD = "stage.json"
QUICK_STEPS = 1 / 1000  # --quick trains this fraction of each stage's steps (at least one)


class RecipeError(ValueError):
    """The recipe is not one this runner can follow, or a run folder belongs to another recipe."""


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    input: str | None  # an earlier stage's name, or a file
    settings: Mapping[str, object]  # command-line options without their dashes, shared ones included
    resume: bool = False


@dataclass(frozen=True)
class Recipe:
    model: str
    data: Path
    stages: tuple[Stage, ...]
    model_id: int | None = None


@dataclass(frozen=True)
class Context:
    """What every stage gets besides its settings."""

    data: Path
    kodak: Path
    threads: int | None = None
    progress: bool = True
    quick: bool = False


@dataclass(frozen=True)
class StageKind:
    """How one kind of stage runs: `python -m {module} {argv(stage, source, folder, context)}`
    writes `folder / output` from `source` (the input's output file, or None).

    `quick` gives the settings of a `--quick` run. `state` names the file a run continues from:
    run again, the command goes on from it (a stopped stage is not started over), and a stage
    with `resume = true` starts from a copy of its input as that file."""

    module: str
    output: str
    argv: Callable[[Stage, Path | None, Path, Context], list[str]]
    quick: Callable[[dict], dict] = dict
    needs_input: bool = True
    state: str | None = None


def options(settings: Mapping[str, object]) -> list[str]:
    """Settings as command-line options: `key = v` -> `--key v`, `true` -> `--key`, `false` -> left
    out, a list -> `--key v1 v2 ...`."""
    argv: list[str] = []
    for key, value in settings.items():
        if value is False:
            continue
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv += [str(v) for v in value]
        elif value is not True:
            argv.append(str(value))
    return argv


def _progress(context: Context) -> list[str]:
    return [] if context.progress else ["--no-progress"]


def _threads(context: Context) -> list[str]:
    return [] if context.threads is None else ["--threads", str(context.threads)]


def _quick_steps(steps: int) -> int:
    return max(1, math.ceil(steps * QUICK_STEPS))


def _train_argv(stage: Stage, source: Path | None, folder: Path, context: Context) -> list[str]:
    # --quick validates nowhere: train validates on the Kodak images it finds in --kodak.
    kodak = folder / "no-validation" if context.quick else context.kodak
    start = ["--init", str(source)] if source is not None and not stage.resume else []
    return ["--data", str(context.data), "--kodak", str(kodak), "--out", str(folder), *start,
            *options(stage.settings), *_threads(context), *_progress(context)]


def _train_quick(settings: dict) -> dict:
    return settings | {"steps": _quick_steps(int(settings.get("steps", 12000))), "batch": 2, "crop": 64,
                       "limit-images": 8, "log-every": 1}


def _postfilter_argv(stage: Stage, source: Path | None, folder: Path, context: Context) -> list[str]:
    return [str(source), "--out", str(folder), "--data", str(context.data), *options(stage.settings),
            *_threads(context), *_progress(context)]


def _postfilter_quick(settings: dict) -> dict:
    return settings | {"steps": _quick_steps(int(settings.get("steps", 8000))), "batch": 2, "crop": 32,
                       "limit-images": 8, "val-images": 2}


def _fit_levels_argv(stage: Stage, source: Path | None, folder: Path, context: Context) -> list[str]:
    return [str(source), str(folder / "fitted.pt"), "--data", str(context.data), *options(stage.settings),
            *_progress(context)]


def _file_argv(output: str, data: bool = False) -> Callable[[Stage, Path | None, Path, Context], list[str]]:
    """`python -m ... INPUT FOLDER/OUTPUT [--data DATA] SETTINGS`."""

    def argv(stage: Stage, source: Path | None, folder: Path, context: Context) -> list[str]:
        return [str(source), str(folder / output), *(["--data", str(context.data)] if data else []),
                *options(stage.settings)]

    return argv


KINDS: dict[str, StageKind] = {
    # a training run (`--init` from the input, or `resume` its run); from scratch without an input
    "train": StageKind("lcodec.models.training.train", "checkpoint.pt", _train_argv, _train_quick,
                       needs_input=False, state="checkpoint.pt"),
    # the levels of a checkpoint relabelled to their targets, as the frozen codec codes
    "fit_levels": StageKind("lcodec.models.training.fit_levels", "fitted.pt", _fit_levels_argv,
                            lambda s: s | {"images": 2}),
    # a checkpoint frozen into the file the codec runs
    "freeze": StageKind("lcodec.models.training.freeze", "frozen.pt", _file_argv("frozen.pt")),
    # a post-filter trained on a frozen model's decoded images; the frozen model with it
    "postfilter": StageKind("lcodec.models.training.postfilter", "frozen.pt", _postfilter_argv, _postfilter_quick,
                            state="checkpoint.pt"),
    # a frozen lifting model's subband context fitted on its training latents, levels refitted
    "context": StageKind("lcodec.models.training.context", "frozen.pt", _file_argv("frozen.pt", data=True),
                         lambda s: s | {"images": 2, "level-images": 0}),
    # a frozen model's z tables counted per rate bucket, levels refitted
    "z_tables": StageKind("lcodec.models.training.z_tables", "frozen.pt", _file_argv("frozen.pt", data=True),
                          lambda s: s | {"images": 2, "level-images": 0}),
    # a checkpoint's latent width changed or a rate level added
    "widen": StageKind("lcodec.models.training.widen", "widened.pt", _file_argv("widened.pt", data=True),
                       lambda s: s | ({"images": 2} if "images" in s else {})),
}


def _document(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The TOML of the recipe at `path` with the recipes it extends merged in: their stages (and
    shared settings and data) come first, the base's base before them."""
    path = Path(path)
    if path.resolve() in seen:
        raise RecipeError(f"{seen[0]}: its recipes extend each other in a circle ({path})")
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise RecipeError(f"{seen[0] if seen else path}: {'its base recipe ' if seen else ''}{path}: {e}") from None
    unknown = set(doc) - {"model", "model_id", "data", "shared", "stages", "extends"}
    if unknown:
        raise RecipeError(f"{path}: unknown keys {sorted(unknown)}")
    if "extends" not in doc:
        return doc
    base = _document(path.parent / doc["extends"], seen + (path.resolve(),))
    shared = {k: dict(base.get("shared", {}).get(k, {})) | dict(v) for k, v in doc.get("shared", {}).items()}
    return {"data": base.get("data")} | {k: v for k, v in doc.items() if k != "extends"} | {
        "shared": dict(base.get("shared", {})) | shared,
        "stages": list(base.get("stages", [])) + list(doc.get("stages", []))}


def load(path: Path) -> Recipe:
    """The recipe at `path`, checked: known kinds, unique names, inputs that come first."""
    doc = _document(path)
    if "model" not in doc or not doc.get("stages"):
        raise RecipeError(f"{path}: a recipe names its model and has at least one [[stages]]")
    shared = doc.get("shared", {})
    if not set(shared) <= set(KINDS):
        raise RecipeError(f"{path}: [shared.KIND] tables are for the kinds {sorted(KINDS)}, "
                          f"not {sorted(set(shared) - set(KINDS))}")
    stages: list[Stage] = []
    for i, s in enumerate(doc["stages"]):
        where = f"{path}: stage {i + 1} ({s.get('name', 'unnamed')})"
        unknown = set(s) - {"name", "kind", "input", "resume", "settings"}
        if unknown:
            raise RecipeError(f"{where}: unknown keys {sorted(unknown)}")
        if "name" not in s or s.get("kind") not in KINDS:
            raise RecipeError(f"{where}: a stage has a name and a kind, one of {sorted(KINDS)}")
        kind = KINDS[s["kind"]]
        if s["name"] in {t.name for t in stages} or "/" in s["name"]:
            raise RecipeError(f"{where}: stage names are unique folder names")
        source = s.get("input")
        if source is None and kind.needs_input:
            raise RecipeError(f"{where}: a {s['kind']} stage needs an input")
        if s.get("resume") and (kind.state is None or source is None):
            raise RecipeError(f"{where}: only a {'/'.join(k for k, v in KINDS.items() if v.state)} stage with an "
                              "input can resume its input's run")
        if source is not None and source not in {t.name for t in stages} and not Path(source).is_file():
            raise RecipeError(f"{where}: its input {source!r} is neither an earlier stage nor a file")
        settings = dict(shared.get(s["kind"], {})) | dict(s.get("settings", {}))
        stages.append(Stage(s["name"], s["kind"], source, settings, bool(s.get("resume", False))))
    return Recipe(doc["model"], Path(doc.get("data", "../shared/data/train")), tuple(stages), doc.get("model_id"))


@dataclass
class Run:
    """A recipe followed in the folder `out`."""

    recipe: Recipe
    out: Path
    context: Context
    log: Callable[[str], None] = print
    outputs: dict[str, Path] = field(default_factory=dict)

    def stage(self, stage: Stage) -> Stage:
        """`stage` with the settings it runs with (`--quick` changes some)."""
        if not self.context.quick:
            return stage
        return Stage(stage.name, stage.kind, stage.input, KINDS[stage.kind].quick(dict(stage.settings)), stage.resume)

    def source(self, stage: Stage) -> Path | None:
        if stage.input is None:
            return None
        return self.outputs[stage.input] if stage.input in self.outputs else Path(stage.input)

    def command(self, stage: Stage) -> list[str]:
        """The stage's single-stage command line."""
        stage = self.stage(stage)
        kind = KINDS[stage.kind]
        return ["python", "-m", kind.module, *kind.argv(stage, self.source(stage), self.out / stage.name, self.context)]

    def shell(self, stage: Stage) -> str:
        """The stage as shell commands: a stage that resumes its input's run starts from a copy of it."""
        command = shlex.join(self.command(stage))
        if not stage.resume:
            return command
        folder, source = self.out / stage.name, self.source(stage)
        copies = [str(source)] + ([str(source.parent / "log.jsonl")] if stage.input in self.outputs else [])
        return (f"mkdir -p {shlex.quote(str(folder))} && cp {shlex.join(copies)} {shlex.quote(str(folder))}/ && "
                + command)

    def record(self, stage: Stage) -> dict:
        """What `stage.json` holds of a stage from its start: a folder with another record is another run's."""
        stage = self.stage(stage)
        source = self.source(stage)
        return {"kind": stage.kind, "settings": dict(stage.settings), "resume": stage.resume,
                "input": str(source) if source else None, "input_sha256": sha256_file(source) if source else None}

    def run(self, dry_run: bool = False) -> Path:
        """Every stage not done yet, in order; the path of the model (the last stage's output)."""
        for stage in self.recipe.stages:
            kind = KINDS[stage.kind]
            folder = self.out / stage.name
            self.outputs[stage.name] = folder / kind.output
            if dry_run:
                self.log(self.shell(stage))
                continue
            record, path = self.record(stage), folder / RECORD
            if path.exists():
                saved = json.loads(path.read_text())
                mismatch = [k for k in ("kind", "settings", "resume", "input_sha256") if saved.get(k) != record[k]]
                if mismatch:
                    raise RecipeError(f"{folder} was begun with another {' and '.join(mismatch)}; give another "
                                      "--out or remove the folder")
                if "sha256" in saved:
                    self.log(f"{stage.name}: done")
                    continue
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1) + "\n")
            self._run_stage(stage, folder)
            path.write_text(json.dumps(record | {"output": kind.output, "sha256": sha256_file(self.outputs[stage.name]),
                                                 "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1) + "\n")
        last = self.outputs[self.recipe.stages[-1].name]
        if dry_run:
            return last
        model = self.out / f"{self.recipe.model}.pt"
        shutil.copyfile(last, model)
        self.log(f"{model}: sha256 {sha256_file(model)}")
        return model

    def _run_stage(self, stage: Stage, folder: Path) -> None:
        kind = KINDS[stage.kind]
        source = self.source(stage)
        if stage.resume and not (folder / kind.state).exists():
            shutil.copyfile(source, folder / kind.state)
            if (source.parent / "log.jsonl").exists() and stage.input in self.outputs:  # the run's log goes on
                shutil.copyfile(source.parent / "log.jsonl", folder / "log.jsonl")
        elif kind.state is None:
            (folder / kind.output).unlink(missing_ok=True)  # a stopped one-shot stage starts over
        command = self.command(stage)
        self.log(f"{stage.name}: {shlex.join(command)}")
        importlib.import_module(kind.module).main(command[3:])
        if not (folder / kind.output).exists():
            raise RecipeError(f"{stage.name}: {kind.module} did not write {folder / kind.output}")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the run folder: one folder per stage")
    p.add_argument("--data", type=Path, default=None, help="the training images (default: the recipe's)")
    p.add_argument("--kodak", type=Path, default=Path("../shared/data/kodak"), help="validation images")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the training stages")
    p.add_argument("--quick", action="store_true",
                   help="every stage for a thousandth of its steps on a few small crops, without validation")
    p.add_argument("--dry-run", action="store_true", help="print each stage's command instead of running it")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        recipe = load(args.recipe)
        context = Context(args.data or recipe.data, args.kodak, args.threads, not args.no_progress, args.quick)
        return Run(recipe, args.out, context).run(dry_run=args.dry_run)
    except RecipeError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
