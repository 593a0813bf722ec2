"""Mixed-precision recipes: parsing, which override decides a layer, the
hash in the cache key, and torchao cells built from recipes."""

import pytest

from qbench.core.errors import QBenchError
from qbench.sdk.recipes import Override, Recipe, keep_most_sensitive, load_recipe, write_recipe

RECIPE = """\
backend: torchao
base: int4-wo-g32
overrides:
  - match: model.layers.1.mlp.down_proj
    keep: true
  - match: ["*.down_proj", "*.v_proj"]
    use: int8-wo
source: {made_by: hand}
"""


@pytest.fixture
def torchao():
    from qbench.sdk.registry import PluginSettings, get_backend, load_plugins

    return get_backend(load_plugins(PluginSettings.from_env(())), "torchao")


def test_first_matching_override_decides_a_layer(tmp_path):
    recipe = load_recipe(tmp_path.joinpath("r.yaml").write_text(RECIPE) and tmp_path / "r.yaml")
    assert recipe.decide("model.layers.1.mlp.down_proj").keep
    assert recipe.decide("model.layers.0.mlp.down_proj").use == "int8-wo"
    assert recipe.decide("model.layers.0.self_attn.v_proj").use == "int8-wo"
    assert recipe.decide("model.layers.0.self_attn.q_proj") is None  # the base
    assert recipe.variants() == {"int4-wo-g32", "int8-wo"}


def test_digest_follows_content_not_formatting_or_provenance(tmp_path):
    a = load_recipe(tmp_path.joinpath("a.yaml").write_text(RECIPE) and tmp_path / "a.yaml")
    reformatted = RECIPE.replace("  - match: model.layers.1.mlp.down_proj\n    keep: true",
                                 "  - {keep: true, match: [model.layers.1.mlp.down_proj]}  # the worst layer")
    b = load_recipe(tmp_path.joinpath("b.yaml").write_text(reformatted.replace("hand", "a script"))
                    and tmp_path / "b.yaml")
    assert a.digest() == b.digest() and a.source != b.source
    changed = a.model_copy(update={"overrides": a.overrides[1:]})
    assert changed.digest() != a.digest()
    # Written and read back: the same recipe.
    assert load_recipe(write_recipe(a, tmp_path / "c.yaml")) == a


@pytest.mark.parametrize("text,message", [
    ("base: [int4", "not valid YAML"),
    ("- base: int4-wo-g32\n", "must be a mapping"),
    ("overrides: []\n", "base"),
    ("base: int4-wo-g32\nsalt: 1\n", "salt"),
    ("base: int4-wo-g32\noverrides:\n  - {match: '*'}\n", "exactly one of"),
    ("base: int4-wo-g32\noverrides:\n  - {match: [], keep: true}\n", "at least one 'match' pattern"),
])
def test_malformed_recipes_fail_with_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(QBenchError, match=message) as caught:
        load_recipe(path)
    assert "\n" not in str(caught.value)


def test_recipe_setting_takes_its_base_and_keeps_the_hash_in_the_record_and_cache_key(tmp_path, torchao):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    _, config = torchao.parse_variant(f"recipe={path}")
    assert (config.bits, config.granularity) == (4, "group:32")
    settings = config.settings()
    assert settings["recipe_sha256"] == config.recipe.digest()
    # A stored record's settings rebuild the same config without the file.
    path.unlink()
    again = type(config)(**settings)
    assert again == config and again.cache_settings() == config.cache_settings()
    assert "recipe_sha256" in config.cache_settings() and "recipe" not in config.cache_settings()
    other = config.model_copy(update={"recipe": config.recipe.model_copy(update={"overrides": []})})
    assert other.settings()["recipe_sha256"] != settings["recipe_sha256"]
    assert config.layer_variant("model.layers.1.mlp.down_proj") is None
    assert config.layer_variant("model.layers.0.mlp.down_proj").bits == 8
    assert config.layer_variant("model.layers.0.self_attn.q_proj") is config


def test_keep_most_sensitive_upgrades_the_first_k_units():
    ranked = [("*.down_proj", ["a.down_proj", "b.down_proj"]), ("*.v_proj", ["a.v_proj"]), ("*.q_proj", ["a.q_proj"])]
    recipe = keep_most_sensitive("torchao", "int4-wo-g32", ranked, 2, "int8-wo", {"from": "test"})
    assert recipe.overrides == [Override(match=("a.down_proj", "b.down_proj", "a.v_proj"), use="int8-wo")]
    assert recipe.source["kept_units"] == ["*.down_proj", "*.v_proj"] and recipe.source["k"] == 2
    kept = keep_most_sensitive("torchao", "int4-wo-g32", ranked, 1, None, {})
    assert kept.overrides[0].keep and kept.decide("a.q_proj") is None
    assert keep_most_sensitive("torchao", "int4-wo-g32", ranked, 0, None, {}).overrides == []
    assert isinstance(recipe, Recipe)


def test_recipe_cells_land_between_their_variants(tiny_model, tiny_suite, tmp_path):
    """A recipe that quantizes every layer as int8-wo is int8-wo: same bytes,
    same KLD. One that keeps every down_proj in full precision on an int4
    base holds more bytes than int4 and moves the model less."""
    import qbench
    from qbench.execute.results import ResultStore

    every = tmp_path / "all-int8.yaml"
    every.write_text("base: int4-wo-g32\noverrides:\n  - {match: '*', use: int8-wo}\n")
    keep = tmp_path / "keep-down.yaml"
    keep.write_text("base: int4-wo-g32\noverrides:\n  - {match: '*.down_proj', keep: true}\n")
    cells = ["torchao:int8-wo", "torchao:int4-wo-g32", f"torchao:recipe={every}", f"torchao:recipe={keep}"]
    df = qbench.run(model=str(tiny_model), suite=str(tiny_suite), backends=cells, device="cpu",
                    output_dir=str(tmp_path / "out"))
    records = ResultStore(df.attrs["run_dir"]).latest()
    int8, int4, as_int8, kept = (records[c] for c in cells)
    assert all(r.ok for r in (int8, int4, as_int8, kept)), [r.error for r in (int8, int4, as_int8, kept)]
    assert as_int8.value("weight_bytes") == int8.value("weight_bytes")
    assert as_int8.value("kld") == pytest.approx(int8.value("kld"), rel=1e-6)
    assert int4.value("weight_bytes") < kept.value("weight_bytes") < records["fp:fp32"].value("weight_bytes")
    assert kept.value("kld") < int4.value("kld")
    assert kept.config["recipe_sha256"] == load_recipe(keep).digest()
    assert kept.artifact.meta["recipe"]["kept_layers"] == 2  # two blocks' down_proj


def test_overrides_are_checked_against_the_models_layers():
    """An override that matches no layer once ran silently as the uniform
    base (override_layers: 0). Now it is an error with the closest names;
    what matches less than written is a note."""
    from qbench.core.errors import QBenchError
    from qbench.sdk.recipes import Override, Recipe

    layers = [f"model.layers.{i}.{kind}" for i in range(2)
              for kind in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    typo = Recipe(base="int4-wo-g32", overrides=[Override(match=("*.dwon_proj",), keep=True)])
    with pytest.raises(QBenchError, match=r"override 1 \(\*\.dwon_proj\) matches none of the model's 6 linear "
                                          r"layers; closest names: .*mlp.down_proj"):
        typo.check_matches(layers)
    recipe = Recipe(base="int4-wo-g32", overrides=[
        Override(match=("model.layers.0.*",), keep=True),
        Override(match=("*.down_proj", "*.gate_proj"), use="int8-wo")])
    assert recipe.check_matches(layers) == [
        "recipe override 2: pattern '*.gate_proj' matches no layer",
        "recipe override 2 matches 2 layers, of which 1 an earlier override decides (the first match wins)"]
    assert Recipe(base="int4-wo-g32", overrides=[Override(match=("*.v_proj",), keep=True)]).check_matches(layers) == []
