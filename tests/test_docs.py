"""The documents say what the code does: SPEC.md's model table is the registry's, and the model
card's numbers are the ones the benchmark wrote."""

import re
from pathlib import Path

from lcodec.models import registry

ROOT = Path(__file__).resolve().parents[1]


def _spec_model_rows() -> dict[int, tuple[str, str, str]]:
    text = (ROOT / "bitstream" / "SPEC.md").read_text()
    section = text.split("## Model table", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].isdigit():
            rows[int(cells[0])] = (cells[1], cells[2].strip("`"), cells[3].strip("`"))
    return rows


def test_spec_model_table_is_the_registry():
    rows = _spec_model_rows()
    assert sorted(rows) == sorted(registry.MODELS)
    for model_id, entry in registry.MODELS.items():
        assert rows[model_id] == (entry.name, entry.filename, entry.sha256), f"model {model_id}"


def test_spec_names_the_default_model():
    text = (ROOT / "bitstream" / "SPEC.md").read_text()
    assert re.search(rf"default model is id {registry.DEFAULT_MODEL_ID}\b", text)


CARD = ROOT / "models" / "weights" / "MODEL_CARD.md"


def test_the_model_card_is_the_default_models():
    entry = registry.MODELS[registry.DEFAULT_MODEL_ID]
    text = CARD.read_text()
    assert text.startswith(f"# Model card: `{entry.name}` (model id {entry.model_id})")
    assert entry.sha256 in text and entry.filename in text


def test_the_model_cards_kodak_table_is_the_one_model_table_wrote():
    """Not retyped: the lines of `kodak_eval.model_table`'s markdown for the default model."""
    table = (ROOT / "models" / "history" / f"kodak-{registry.DEFAULT_MODEL_ID}.md").read_text().strip()
    assert table in CARD.read_text()


def test_the_model_card_and_the_training_history_stay_short():
    assert len(CARD.read_text().splitlines()) <= 150
    assert len((ROOT / "models" / "history" / "TRAINING_HISTORY.md").read_text().splitlines()) <= 150
