"""qbench sensitivity: units, ranking, the in-place quantize/restore cycle,
figures that move with the bit width, and resuming an interrupted pass."""

import json

import pytest
import torch

from qbench.analyze.sensitivity import SensitivityRow, heatmap_matrix, ranked, units
from qbench.core.records import Metric

NAMES = [f"model.layers.{b}.{part}" for b in (0, 1) for part in ("self_attn.q_proj", "mlp.down_proj")] + ["lm_head"]


def _row(unit: str, kld: float, mode: str = "only") -> SensitivityRow:
    figure = Metric(value=kld, unit="nats", n=10, stderr=0.001)
    return SensitivityRow(unit=unit, layers=[unit], mode=mode, kld=figure, same_top_p=figure,
                          ln_ppl_ratio=figure, seconds=0.0)


def test_units_group_layers_by_layer_type_and_block():
    assert units(NAMES, "layer") == {name: [name] for name in NAMES}
    assert units(NAMES, "type") == {
        "*.q_proj": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"],
        "*.down_proj": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
        "*.lm_head": ["lm_head"]}
    assert units(NAMES, "block") == {"block 0": NAMES[:2], "block 1": NAMES[2:4], "lm_head": ["lm_head"]}


def test_ranking_puts_the_most_harmful_unit_first_in_both_modes():
    only = [_row("a", 0.01), _row("b", 0.30), _row("c", 0.02)]
    assert [r.unit for r in ranked(only)] == ["b", "c", "a"]
    # all-but: the unit whose keeping leaves the lowest KLD helps most.
    converse = [_row("a", 0.20, "all-but"), _row("b", 0.05, "all-but"), _row("c", 0.10, "all-but")]
    assert [r.unit for r in ranked(converse)] == ["b", "c", "a"]


def test_heatmap_matrix_is_block_by_layer_type():
    rows = [_row(NAMES[0], 0.1), _row(NAMES[1], 0.2), _row(NAMES[3], 0.4), _row("lm_head", 9.0)]
    blocks, types, values = heatmap_matrix(rows)
    assert blocks == [0, 1] and types == ["q_proj", "down_proj"]
    assert values == [[0.1, 0.2], [None, 0.4]]


@pytest.fixture(scope="module")
def int4_pass(tiny_model, tiny_suite, tmp_path_factory):
    from qbench.api import sensitivity

    out = tmp_path_factory.mktemp("sensitivity")
    table, folder = sensitivity("torchao:int4-wo-g32", model=str(tiny_model), suite=str(tiny_suite), unit="layer",
                                device="cpu", max_tokens=200, output_dir=str(out), run_id="int4")
    return table, folder, out


def test_every_layer_is_measured_ranked_and_drawn(int4_pass):
    table, folder, _ = int4_pass
    assert len(table) == 14  # 2 blocks x 7 linear layers; lm_head is kept by the variant
    assert (table["kld"] > 0).all() and (table["kld_stderr"] > 0).all()
    assert list(table["kld"]) == sorted(table["kld"], reverse=True)
    assert (table["same_top_p"] <= 1).all()
    assert len((folder / "sensitivity.jsonl").read_text().splitlines()) == 14
    assert (folder / "sensitivity_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_a_recipe_from_a_pass_upgrades_its_most_harmful_units(int4_pass, tmp_path):
    from qbench.api import recipe_from_sensitivity
    from qbench.core.errors import QBenchError
    from qbench.sdk.recipes import load_recipe

    table, folder, _ = int4_pass
    path = recipe_from_sensitivity(folder, "torchao:int4-wo-g32", 2, "int8-wo", tmp_path / "top2.yaml")
    recipe = load_recipe(path)
    assert recipe.base == "int4-wo-g32" and recipe.source["kept_units"] == list(table["unit"][:2])
    assert [recipe.decide(unit).use for unit in table["unit"][:2]] == ["int8-wo", "int8-wo"]
    assert all(recipe.decide(unit) is None for unit in table["unit"][2:])
    # A recipe that could not run (a CUDA-only variant beside a CPU one) is refused and not left behind.
    with pytest.raises(QBenchError, match="one compute dtype and device"):
        recipe_from_sensitivity(folder, "torchao:int4-wo-g32", 1, "float8-wo", tmp_path / "bad.yaml")
    assert not (tmp_path / "bad.yaml").exists()


def test_coarser_quantization_moves_every_unit_more(int4_pass, tiny_model, tiny_suite):
    from qbench.api import sensitivity

    int4, _, out = int4_pass
    int8, _ = sensitivity("torchao:int8-wo", model=str(tiny_model), suite=str(tiny_suite), unit="layer",
                          device="cpu", max_tokens=200, output_dir=str(out), run_id="int8")
    coarse, fine = int4.set_index("unit")["kld"], int8.set_index("unit")["kld"]
    assert (coarse > fine.reindex(coarse.index)).all()


def test_quantize_and_restore_leave_the_full_precision_model_unchanged(tiny_model):
    from qbench.sdk.registry import PluginSettings, load_plugins

    backend = load_plugins(PluginSettings(allow=("builtin",))).backends["torchao"]
    _, config = backend.parse_variant("int4-wo-g32")
    quantizer = backend.layer_quantizer(str(tiny_model), config, "cpu")
    ids = torch.arange(1, 30)[None]
    before = quantizer.model(ids).logits
    saved = quantizer.quantize(quantizer.layers()[:3])
    assert not torch.equal(quantizer.model(ids).logits, before)
    quantizer.restore(saved)
    assert torch.equal(quantizer.model(ids).logits, before)


def test_an_interrupted_pass_resumes_with_the_units_left(int4_pass, tiny_model, tiny_suite, monkeypatch):
    from qbench.analyze import sensitivity as sens
    from qbench.api import sensitivity

    _, folder, out = int4_pass
    rows = (folder / "sensitivity.jsonl").read_text().splitlines()
    (folder / "sensitivity.jsonl").write_text("\n".join(rows[:-2]) + "\n")  # the last two units never finished
    reference = (folder / "reference.safetensors").stat().st_mtime_ns
    measured = []
    monkeypatch.setattr(sens.Scorer, "score", lambda self, model, real=sens.Scorer.score:
                        measured.append(1) or real(self, model))
    table, _ = sensitivity("torchao:int4-wo-g32", model=str(tiny_model), suite=str(tiny_suite), unit="layer",
                           device="cpu", max_tokens=200, output_dir=str(out), run_id="int4")
    assert len(measured) == 2 and len(table) == 14
    assert (folder / "reference.safetensors").stat().st_mtime_ns == reference  # the baseline ran once
    assert [json.loads(line)["unit"] for line in rows[-2:]] == \
        [json.loads(line)["unit"] for line in (folder / "sensitivity.jsonl").read_text().splitlines()[-2:]]


def test_resuming_with_other_settings_is_refused(int4_pass, tiny_model, tiny_suite):
    from qbench.api import sensitivity
    from qbench.core.errors import QBenchError

    _, _, out = int4_pass
    with pytest.raises(QBenchError, match="other settings .*unit"):
        sensitivity("torchao:int4-wo-g32", model=str(tiny_model), suite=str(tiny_suite), unit="type",
                    device="cpu", max_tokens=200, output_dir=str(out), run_id="int4")


def test_the_converse_keeps_one_unit_and_quantizes_the_rest(tiny_model, tiny_suite, tmp_path):
    from qbench.api import sensitivity

    only, _ = sensitivity("torchao:int4-wo-g32", model=str(tiny_model), suite=str(tiny_suite), unit="block",
                          device="cpu", max_tokens=200, output_dir=str(tmp_path), run_id="only")
    converse, _ = sensitivity("torchao:int4-wo-g32", model=str(tiny_model), suite=str(tiny_suite), unit="block",
                              device="cpu", max_tokens=200, output_dir=str(tmp_path), run_id="all-but",
                              mode="all-but")
    assert set(converse["unit"]) == set(only["unit"]) == {"block 0", "block 1"}
    # With two blocks, "all but block 0" quantizes exactly block 1.
    a, b = only.set_index("unit")["kld"], converse.set_index("unit")["kld"]
    assert b["block 0"] == pytest.approx(a["block 1"]) and b["block 1"] == pytest.approx(a["block 0"])


def test_a_damaged_folder_resumes_or_says_what_to_do(int4_pass, tiny_model, tiny_suite):
    """A row cut by a kill is measured again; an unreadable reference is
    computed again (with a warning); a damaged settings file or a bad row in
    the middle is one clear error."""
    from qbench.api import sensitivity
    from qbench.core.errors import QBenchError

    _, folder, out = int4_pass
    rows = folder / "sensitivity.jsonl"
    whole = rows.read_text().splitlines()
    rows.write_text("\n".join(whole[:-1]) + "\n" + whole[-1][:30])  # the last row torn mid-write
    (folder / "reference.safetensors").write_bytes(b"\x00" * 10)

    def again():
        return sensitivity("torchao:int4-wo-g32", model=str(tiny_model), suite=str(tiny_suite), unit="layer",
                           device="cpu", max_tokens=200, output_dir=str(out), run_id="int4")

    with pytest.warns(UserWarning, match="unreadable"):
        table, _ = again()
    assert len(table) == 14 and len(rows.read_text().splitlines()) == 14
    lines = rows.read_text().splitlines()
    rows.write_text("\n".join(lines[:3] + ["{not a row"] + lines[3:]) + "\n")
    with pytest.raises(QBenchError, match="line 4 is not a sensitivity row"):
        again()
    rows.write_text("\n".join(lines) + "\n")
    (folder / "sensitivity.json").write_text("[1, 2]")
    with pytest.raises(QBenchError, match="sensitivity.json is not the JSON qbench wrote"):
        again()


def test_sensitivity_and_search_share_one_default_unit():
    """The CLI spells the default out (qbench.analyze.sensitivity imports torch); it
    must stay the one the API and the module name."""
    import inspect

    from qbench import api
    from qbench.analyze.sensitivity import DEFAULT_UNIT
    from qbench.cli import cli

    for command in ("sensitivity", "search"):
        unit = next(p for p in cli.commands[command].params if p.name == "unit")
        assert unit.default == DEFAULT_UNIT, command
    for function in (api.sensitivity, api.search):
        assert inspect.signature(function).parameters["unit"].default == DEFAULT_UNIT
