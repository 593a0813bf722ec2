import json
import textwrap

import pytest
from click.testing import CliRunner

from qbench.cli import cli
from qbench.core.errors import QBenchError
from qbench.sdk.registry import PluginSettings, load_plugins
from tests.conftest import FAKE_PLUGINS


def backends_json(*args):
    result = CliRunner().invoke(cli, ["backends", "--json", "--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    return {e["backend"]: e for e in json.loads(result.output)}


def test_backends_table_shows_each_backends_settings_once(monkeypatch):
    """A backend's row holds the settings its variants share; a variant's row
    what sets it apart; --verbose every setting on every row."""
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setenv("QBENCH_PLUGINS", "builtin")
    short = CliRunner().invoke(cli, ["backends", "--device", "cpu"])
    assert short.exit_code == 0, short.output
    lines = short.output.splitlines()
    bf16 = next(line for line in lines if " bf16 " in line and "dtype=" in line)
    assert "dtype=bf16" in bf16 and "runtime=" not in bf16
    assert short.output.count("runtime=eager") == short.output.count("all variants:")  # once per backend
    full = CliRunner().invoke(cli, ["backends", "--device", "cpu", "--verbose"])
    assert full.exit_code == 0 and full.output.count("runtime=eager") > 20


def test_builtin_fp_backend_lists_its_variants_with_settings():
    fp = backends_json()["fp"]
    assert [v["name"] for v in fp["variants"]] == ["fp32", "bf16", "fp16"]
    assert fp["variants"][1]["settings"] == {"dtype": "bf16", "runtime": "eager", "compile_mode": "max-autotune",
                                          "calibration": "default", "kv_cache": "full"}
    assert fp["variants"][1]["nominal_bits"] == 16
    assert list(fp["kv_caches"]) == ["full", "fp8", "hqq-int8", "hqq-int4", "hqq-int2", "quanto-int4", "quanto-int2"]
    assert fp["available"] and fp["version"]
    assert fp["plugin"] == "fp"  # registered through the entry point, like a third-party plugin


def test_fake_backend_from_plugins_dir_appears():
    entries = backends_json("--plugins-dir", str(FAKE_PLUGINS))
    assert "fake" in entries
    assert {v["name"] for v in entries["fake"]["variants"]} >= {"ok", "raise", "exit", "hang"}
    assert entries["fake"]["plugin"].endswith("qbench_fakes.py")


def test_plugins_dir_from_env(monkeypatch):
    monkeypatch.setenv("QBENCH_PLUGINS_DIR", str(FAKE_PLUGINS))
    assert "fake" in load_plugins(PluginSettings.from_env()).backends


def test_block_env_var_hides_builtin(monkeypatch):
    monkeypatch.setenv("QBENCH_BLOCK_PLUGINS", "fp")
    assert "fp" not in load_plugins(PluginSettings.from_env()).backends


def test_empty_allowlist_loads_no_entry_point(monkeypatch):
    monkeypatch.setenv("QBENCH_PLUGINS", "")
    assert load_plugins(PluginSettings.from_env()).backends == {}


def test_misspelled_hook_fails_loudly(tmp_path):
    (tmp_path / "typo.py").write_text(textwrap.dedent("""
        from qbench import hookimpl

        @hookimpl
        def register_backend(register):  # missing the final "s"
            pass
    """))
    with pytest.raises(QBenchError, match="unknown hook.*register_backend.*known hooks: register_backends"):
        load_plugins(PluginSettings(plugin_dirs=(str(tmp_path),)))


def test_misspelled_hook_exits_nonzero_with_one_line(tmp_path):
    from qbench.cli import main

    (tmp_path / "typo.py").write_text("from qbench import hookimpl\n@hookimpl\ndef register_backendz(register): pass\n")
    with pytest.raises(SystemExit) as exc:
        main(["backends", "--plugins-dir", str(tmp_path)])
    assert exc.value.code == 2


def test_duplicate_backend_name_names_both_plugins(tmp_path):
    (tmp_path / "dup.py").write_text(textwrap.dedent("""
        from qbench import hookimpl
        import qbench_plugins.fp as fp

        @hookimpl
        def register_backends(register):
            register(fp.FullPrecision())
    """))
    with pytest.raises(QBenchError, match=r"registered twice, by 'fp' and 'file:.*dup.py'"):
        load_plugins(PluginSettings(plugin_dirs=(str(tmp_path),), allow=("builtin",)))


def test_plugin_that_fails_to_import_is_named(tmp_path):
    (tmp_path / "broken.py").write_text("raise ImportError('no such thing')\n")
    with pytest.raises(QBenchError, match="broken.py failed to import"):
        load_plugins(PluginSettings(plugin_dirs=(str(tmp_path),)))


def test_unknown_variant_and_bad_custom_settings_are_rejected():
    fp = load_plugins(PluginSettings(allow=("builtin",))).backends["fp"]
    with pytest.raises(QBenchError, match="unknown variant 'int3'.*fp32, bf16, fp16"):
        fp.parse_variant("int3")
    with pytest.raises(QBenchError, match="field 'dtype'"):
        fp.parse_variant("dtype=fp8")
    with pytest.raises(QBenchError, match="field 'colour'"):
        fp.parse_variant("colour=red")
    assert fp.parse_variant("dtype=bf16")[1].dtype == "bf16"


def test_unavailable_backend_says_why_and_how_to_fix(tmp_path):
    (tmp_path / "needs.py").write_text(textwrap.dedent("""
        from qbench import hookimpl
        from qbench.sdk.backend import Backend, VariantConfig

        class Needy(Backend):
            name = "needy"
            requires = {"qbench_no_such_module": "qbench-no-such-package>=1"}
            def variants(self): return {"v": VariantConfig()}
            def quantize(self, *a): return {}
            def load(self, *a): raise AssertionError

        @hookimpl
        def register_backends(register):
            register(Needy())
    """))
    needy = backends_json("--plugins-dir", str(tmp_path))["needy"]
    assert not needy["available"]
    assert needy["reason"] == "missing qbench_no_such_module: pip install qbench-no-such-package>=1"
    assert needy["variants"][0]["reason"] == needy["reason"]
