"""One command makes the default model: every shipped model has a recipe; id 11's holds the
settings the runs that made it recorded, and id 12's extends it; and the runner follows a recipe
stage by stage, continuing where it stopped."""

import collections
import json
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcodec import engine
from lcodec.models.registry import DEFAULT_MODEL_ID, MODELS
from lcodec.models.training import recipe, train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "models" / "recipes"
RECIPE = RECIPES / "lift-97-128-v5.toml"  # id 11, whose runs' states and logs are committed
CHECKPOINTS = ROOT / "models" / "checkpoints"
HISTORY = ROOT / "models" / "history"
# The runs that made id 11: the arguments each stage's committed state recorded, and its log.
STATES = {"lift": "lift-97-128-run.pt", "entropy-rate": "lift-97-128-v2-run.pt",
          "small-scales": "lift-97-128-v3-run.pt", "coarse-levels": "lift-97-128-v4-run.pt",
          "postfilter": "lift-97-128-v5-postfilter.pt"}
LOGS = {"lift-hold": "lift-97-128.log.jsonl", "lift": "lift-97-128.log.jsonl",
        "entropy-rate": "lift-97-128-v2.log.jsonl", "small-scales": "lift-97-128-v3.log.jsonl",
        "coarse-levels": "lift-97-128-v4.log.jsonl", "postfilter": "lift-97-128-v5.log.jsonl"}
# Recorded arguments that say where and how fast a run ran, not what it trained.
NOT_SETTINGS = {"data", "kodak", "out", "init", "frozen", "threads", "no_progress", "ckpt_minutes", "small_copy",
                "limit_images", "compile", "amp"}


@pytest.fixture(scope="module")
def default_recipe() -> recipe.Recipe:
    return recipe.load(RECIPE)


def _stages(r: recipe.Recipe) -> dict[str, recipe.Stage]:
    return {s.name: s for s in r.stages}


def _recorded(name: str) -> dict:
    return torch.load(CHECKPOINTS / STATES[name], map_location="cpu", weights_only=False)["args"]


def _train_args(stage: recipe.Stage) -> dict:
    """Every argument of the stage's train command: the recipe's settings and train's defaults."""
    return vars(train.parse_args(["--out", "x", *recipe.options(stage.settings)]))


def test_the_default_model_has_a_recipe():
    entry = MODELS[DEFAULT_MODEL_ID]
    r = recipe.load(RECIPES / f"{entry.name}.toml")
    assert (r.model, r.model_id) == (entry.name, DEFAULT_MODEL_ID)


def test_the_recipe_makes_id_11(default_recipe):
    assert (default_recipe.model, default_recipe.model_id) == (MODELS[11].name, 11)
    assert [s.kind for s in default_recipe.stages][-3:] == ["fit_levels", "freeze", "postfilter"]


@pytest.mark.parametrize("name", ["lift", "entropy-rate", "small-scales", "coarse-levels"])
def test_each_training_stage_has_the_settings_its_run_recorded(default_recipe, name):
    stage, recorded = _stages(default_recipe)[name], _recorded(name)
    assert {k.replace("-", "_") for k in stage.settings} <= set(recorded), "a setting the run did not record"
    args = _train_args(stage)
    for key in set(recorded) - NOT_SETTINGS:
        assert args[key] == recorded[key], key
    init = recorded.get("init")
    if init and Path(init).name in STATES.values():  # started from a committed state: the input's
        assert Path(init).name == STATES[stage.input]


def test_the_first_stage_is_the_same_run_with_the_gains_held(default_recipe):
    """Id 7's steps 0-1500 left no state of their own: the model card and the log record them."""
    hold, lift = _stages(default_recipe)["lift-hold"], _stages(default_recipe)["lift"]
    assert lift.input == "lift-hold" and lift.resume
    same = {k: v for k, v in _train_args(hold).items() if k not in {"steps", "lr_drop", "gain_lr_scale"}}
    assert same == {k: v for k, v in _train_args(lift).items() if k not in {"steps", "lr_drop", "gain_lr_scale"}}
    assert hold.settings["gain-lr-scale"] == 0 and hold.settings["lr-drop"] >= 1  # held, no lr drop


def test_id_11_records_its_last_training_run_and_its_base(default_recipe, archived_weights):
    shipped = torch.load(MODELS[11].path, map_location="cpu", weights_only=True)["info"]
    assert shipped["training"]["args"] == _recorded("coarse-levels")
    assert shipped["postfilter"]["base_sha256"] == MODELS[10].sha256  # the freeze stage's output is id 10
    fitted = torch.load(CHECKPOINTS / STATES["coarse-levels"], map_location="cpu", weights_only=False)["fitted_levels"]
    assert fitted["images"] == _stages(default_recipe)["fit-levels"].settings["images"]


def test_the_postfilter_stage_has_the_settings_its_run_recorded(default_recipe):
    stage, recorded = _stages(default_recipe)["postfilter"], _recorded("postfilter")
    assert {k.replace("-", "_"): str(v) for k, v in stage.settings.items()} == {
        k: v for k, v in recorded.items() if k not in NOT_SETTINGS}
    assert Path(recorded["frozen"]).name == MODELS[10].filename


def _log_ranges(r: recipe.Recipe) -> dict[str, tuple[int, int]]:
    """Each stage's steps in its log: (first exclusive, last); a resumed stage continues its input's."""
    stages, ranges = _stages(r), {}
    for name in LOGS:
        s = stages[name]
        start = int(stages[s.input].settings["steps"]) if s.resume else 0
        ranges[name] = (start, int(s.settings["steps"]))
    return ranges


@pytest.mark.parametrize("name", sorted(LOGS))
def test_each_stage_has_the_schedule_its_log_recorded(default_recipe, name):
    """Learning rate and its drop, batch size, levels, validation steps and the last step."""
    stage = _stages(default_recipe)[name]
    first, last = _log_ranges(default_recipe)[name]
    records = [json.loads(line) for line in (HISTORY / LOGS[name]).read_text().splitlines()]
    records = [r for r in records if first < r["step"] <= last]
    trained = [r for r in records if r["kind"] == "train"]
    if stage.kind == "train":
        args = _train_args(stage)
        lr, drop, every, val_every = args["lr"], args["lr_drop"], args["log_every"], args["val_every"]
        assert all([lv["target"] for lv in r["levels"]] == args["levels"] for r in trained)
        images = [sum(lv["n"] for lv in r["levels"]) for r in trained]
        assert all(n % args["batch"] == 0 and n <= every * args["batch"] for n in images)
        assert collections.Counter(images).most_common(1)[0][0] == every * args["batch"]
    else:  # the post-filter logs every 100 steps
        lr, drop, every, val_every = stage.settings["lr"], stage.settings["lr-drop"], 100, stage.settings["val-every"]
        assert [r["step"] for r in records if r["kind"] == "calibration"] == [last]
    assert [r["step"] for r in trained] == list(range(first + every, last + 1, every))
    for r in trained:  # the record of step s carries the rate of step s - 1 (counted from 0)
        assert r["lr"] == pytest.approx(lr * (0.1 if r["step"] - 1 >= drop * last else 1)), r["step"]
    assert [r["step"] for r in records if r["kind"] == "val"] == sorted(
        {*range(first + val_every - first % val_every, last + 1, val_every), last})


def test_every_stage_command_parses(default_recipe, tmp_path):
    run = recipe.Run(default_recipe, tmp_path, recipe.Context(tmp_path / "data", tmp_path / "kodak"))
    for stage in default_recipe.stages:
        run.outputs[stage.name] = tmp_path / stage.name / recipe.KINDS[stage.kind].output
        command = run.command(stage)
        assert command[:3] == ["python", "-m", recipe.KINDS[stage.kind].module]
        if stage.kind == "train":
            train.parse_args(command[3:])


@pytest.fixture()
def images(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).resize((64, 64), Image.BILINEAR).save(
            folder / f"{i}.png")
    return folder


def test_quick_mode_runs_every_stage_and_a_second_run_continues_where_it_stopped(images, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [str(RECIPE), "--out", str(out), "--quick", "--data", str(images), "--no-progress", "--threads", "1"]
    model = recipe.main(argv)
    r = recipe.load(RECIPE)
    for stage in r.stages:  # each finished, with its output's digest
        assert "sha256" in json.loads((out / stage.name / recipe.RECORD).read_text())
    lift = torch.load(out / "lift" / "checkpoint.pt", weights_only=False)
    assert lift["step"] == 4 and lift["args"]["lr_drop"] == 0.9  # resumed lift-hold's run (2 steps) to 4
    frozen = torch.load(model, weights_only=True)
    assert frozen["config"]["postfilter"] == 48 and frozen["config"]["coarse_levels"] == 2
    weights = engine.Weights.load(model)
    pixels = np.asarray(Image.open(images / "0.png"))
    engine.decode_array(engine.encode_array(pixels, "RGB", rate=2.0, model_id=11, weights=weights).data,
                        weights=weights)

    # A stage stopped before the end (no output digest yet) runs again; the stages before it do not.
    record = out / "postfilter" / recipe.RECORD
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "sha256"}))
    capsys.readouterr()
    recipe.main(argv)
    said = capsys.readouterr().out
    assert all(f"{s.name}: done" in said for s in r.stages[:-1]) and "postfilter: python -m" in said

    # A folder begun with other settings is refused, not mixed.
    other = replace(r, stages=(replace(r.stages[0], settings={**r.stages[0].settings, "lr": 1e-3}),))
    with pytest.raises(recipe.RecipeError, match="another settings"):
        recipe.Run(other, out, recipe.Context(images, tmp_path, quick=True)).run()

    # Id 12's recipe extends id 11's: in the same folder only its own stage, the context, runs.
    extended = RECIPES / "lift-97-128-v6.toml"
    assert [s.name for s in recipe.load(extended).stages] == [s.name for s in r.stages] + ["context"]
    capsys.readouterr()
    model = recipe.main([str(extended), *argv[1:]])
    said = capsys.readouterr().out
    assert all(f"{s.name}: done" in said for s in r.stages) and "context: python -m" in said
    weights = engine.Weights.load(model)
    assert weights.model.context is not None
    data = engine.encode_array(pixels, "RGB", rate=2.0, model_id=12, weights=weights).data
    assert engine.decode_array(data, weights=weights)[0].shape == pixels.shape


@pytest.mark.parametrize("text,error", [
    ('model = "m"\n[[stages]]\nname = "a"\nkind = "bake"\n', "kind"),
    ('model = "m"\n[[stages]]\nname = "a"\nkind = "freeze"\ninput = "b"\n', "neither an earlier stage"),
    ('model = "m"\n[[stages]]\nname = "a"\nkind = "freeze"\n', "needs an input"),
    ('model = "m"\n[[stages]]\nname = "a"\nkind = "train"\n[[stages]]\nname = "b"\nkind = "freeze"\ninput = "a"\n'
     'resume = true\n', "resume"),
    ('model = "m"\n[[stages]]\nname = "a"\nkind = "train"\n[[stages]]\nname = "a"\nkind = "train"\n', "unique"),
])
def test_a_recipe_the_runner_cannot_follow_is_refused(tmp_path, text, error):
    path = tmp_path / "r.toml"
    path.write_text(text)
    tomllib.loads(text)  # valid TOML: the runner refuses it
    with pytest.raises(recipe.RecipeError, match=error):
        recipe.load(path)


def test_id_12_s_context_stage_has_the_settings_its_weights_recorded():
    """The default model's last stage: its settings are those the shipped file's info recorded."""
    stage = recipe.load(RECIPES / "lift-97-128-v6.toml").stages[-1]
    recorded = torch.load(ROOT / "models" / "archive" / MODELS[12].filename, weights_only=True)["info"]["context"]
    assert stage.kind == "context" and stage.input == "postfilter"
    assert stage.settings == {"images": recorded["images"], "prior": recorded["prior"],
                              "level-images": recorded["fitted_levels"]["images"]}


def test_id_13_s_ll_context_stage_has_the_settings_its_weights_recorded():
    """Id 13's recipe is id 12's and one stage more, whose settings the shipped file recorded."""
    stages = recipe.load(RECIPES / "lift-97-128-v7.toml").stages
    assert [s.name for s in stages] == [s.name for s in recipe.load(RECIPES / "lift-97-128-v6.toml").stages] + [
        "ll-context"]
    stage = stages[-1]
    recorded = torch.load(ROOT / "models" / "archive" / MODELS[13].filename, weights_only=True)["info"]["context"]
    assert stage.kind == "context" and stage.input == "context"
    assert stage.settings == {"ll": True, "images": recorded["ll"]["images"], "prior": recorded["ll"]["prior"],
                              "level-images": recorded["fitted_levels"]["images"]}


def test_id_14_s_post_filter_stage_has_the_settings_its_run_recorded():
    """Id 14's recipe is id 13's and one stage more: the post-filter's fine-tuning, whose committed
    run state recorded the settings (and, in the shipped file, what it started from)."""
    stages = recipe.load(RECIPES / "lift-97-128-v8.toml").stages
    assert [s.name for s in stages] == [s.name for s in recipe.load(RECIPES / "lift-97-128-v7.toml").stages] + [
        "postfilter-top"]
    stage = stages[-1]
    assert stage.kind == "postfilter" and stage.input == "ll-context"
    args = torch.load(CHECKPOINTS / "lift-97-128-v8-postfilter.pt", weights_only=False)["args"]
    assert {k: str(v) for k, v in stage.settings.items()} == {
        "fine-tune": args["fine_tune"], "loss": args["loss"], "focus": args["focus"], "lr": args["lr"],
        "steps": args["steps"]}
    info = torch.load(ROOT / "models" / "archive" / MODELS[14].filename, weights_only=True)["info"]["postfilter"]
    assert info["base_sha256"] == MODELS[13].sha256 and info["step"] == int(args["steps"])


def test_id_15_s_stages_have_the_settings_their_runs_recorded():
    """Id 15's recipe is id 14's and two stages more: the post-filter trained again, whose committed
    run state recorded its settings, and the z tables per rate, whose settings the shipped file
    records."""
    stages = recipe.load(RECIPES / "lift-97-128-v9.toml").stages
    assert [s.name for s in stages] == [s.name for s in recipe.load(RECIPES / "lift-97-128-v8.toml").stages] + [
        "postfilter-top2", "z-tables"]
    postfilter, tables = stages[-2:]
    assert postfilter.kind == "postfilter" and postfilter.input == "postfilter-top"
    args = torch.load(CHECKPOINTS / "lift-97-128-v9-postfilter.pt", weights_only=False)["args"]
    assert {k: str(v) for k, v in postfilter.settings.items()} == {
        "fine-tune": args["fine_tune"], "loss": args["loss"], "focus": args["focus"], "lr": args["lr"],
        "steps": args["steps"]}
    info = torch.load(ROOT / "models" / "weights" / MODELS[15].filename, weights_only=True)["info"]
    assert info["postfilter"]["base_sha256"] == MODELS[14].sha256 and info["postfilter"]["step"] == int(args["steps"])
    assert tables.kind == "z_tables" and tables.input == "postfilter-top2"
    assert tables.settings == {"images": info["z_tables"]["images"]}
