"""z tables per rate: a file's rate parameter picks the set of z tables as SPEC.md says, and the
tool that counts them writes a model that codes ẑ in fewer bits."""
import numpy as np
from PIL import Image

import test_train
from lcodec import engine
from lcodec.models.frozen import FrozenModel
from lcodec.models.training import z_tables

images = test_train.tiny_data  # the fixture of test_train: six 64x64 training pictures


def spec_bucket(centres: list[int], rate_q: int) -> int:
    """SPEC.md, "z tables per rate", in its own words: the number of i < B - 1 with
    (c_i + c_{i+1}) / 2 <= rate_q."""
    return sum(1 for i in range(len(centres) - 1) if (centres[i] + centres[i + 1]) / 2 <= rate_q)


def test_the_default_model_s_buckets_follow_the_spec():
    model = engine.load_model(engine.DEFAULT_MODEL_ID)
    centres = [int(c) for c in model.z_buckets]
    assert centres == list(range(-2048, 12288 + 1, 1024))
    assert model.z_tables.num_tables == len(centres) * model.config.N
    for rq in (-2048, -1537, -1536, -1535, 0, 511, 512, 8191, 8192, 8703, 8704, 12288):
        assert model.z_table_offset(rq) == spec_bucket(centres, rq) * model.config.N, rq
    z_index = model.z_index(8704, 3)
    assert z_index[:4].tolist() == [11 * 128] * 3 + [11 * 128 + 1]


def test_a_model_without_buckets_has_one_table_per_channel():
    model = engine.load_model(0)
    assert model.z_buckets.tolist() == [0] and model.z_tables.num_tables == model.config.N
    assert model.z_table_offset(-2048) == model.z_table_offset(8 * 1024) == 0


def test_the_tool_counts_tables_that_code_z_in_fewer_bits(images, tmp_path):
    source = engine.MODELS[0].path
    out = tmp_path / "frozen.pt"
    z_tables.main([str(source), str(out), "--data", str(images), "--images", "4", "--level-images", "0"])
    before, after = FrozenModel(source), FrozenModel(out)
    assert after.z_buckets.tolist() == list(range(-2048, 8 * 1024 + 1, 1024))
    pixels = np.asarray(Image.open(sorted(images.iterdir())[0]).convert("RGB"))
    for q in (0.0, 7.0):
        rq = round(q * 1024)
        bits = []
        for model in (before, after):
            enc = engine.Encoder(model, pixels, "RGB")
            z, _, _ = enc._symbols(rq)
            bits.append(model.z_tables.cost_bits(z, enc.z_index(rq)))
        assert bits[1] < bits[0], q  # counted on these very pictures
        weights = engine.Weights.load(out)
        data = engine.encode_array(pixels, "RGB", rate=q, model_id=0, weights=weights).data
        assert engine.decode_array(data, weights=weights)[0].shape == pixels.shape

