"""The quantized-artifact cache."""

import os

import pytest

from qbench.cell.artifacts import obtain_artifact
from qbench.core.errors import QBenchError
from qbench.sdk.models import fingerprint
from qbench.sdk.registry import PluginSettings, load_plugins
from tests.conftest import RTN_PLUGIN


@pytest.fixture
def rtn():
    return load_plugins(PluginSettings(plugin_dirs=(str(RTN_PLUGIN),), allow=())).backends["rtn"]


def obtain(backend, spec, model, calibration_hash=None):
    variant, config = backend.parse_variant(spec)
    return obtain_artifact(backend, variant, config, str(model), fingerprint(model), None, calibration_hash)


def test_second_run_hits_and_changed_config_misses(rtn, tiny_model):
    first, hit1, key1 = obtain(rtn, "w4g32", tiny_model)
    second, hit2, key2 = obtain(rtn, "w4g32", tiny_model)
    assert (hit1, hit2) == (False, True) and key1 == key2
    assert second.quantize_seconds == first.quantize_seconds > 0  # recorded even from the cache
    custom, hit3, key3 = obtain(rtn, "bits=4,group_size=32,symmetric=false", tiny_model)
    assert not hit3 and key3 != key1
    _, hit4, key4 = obtain(rtn, "w4g32", tiny_model, calibration_hash="abc")
    assert not hit4 and key4 != key1  # calibration data is part of the key


def test_corrupt_cache_entry_is_reported_with_the_fix(rtn, tiny_model):
    artifact, _, _ = obtain(rtn, "w8g32", tiny_model)
    record = (artifact.path.rsplit("/files", 1)[0]) + "/artifact.json"
    with open(record, "w") as handle:
        handle.write("{ truncated")
    with pytest.raises(QBenchError, match=r"corrupt artifact cache entry .*unreadable artifact.json.*rm -r"):
        obtain(rtn, "w8g32", tiny_model)


def test_missing_artifact_file_is_reported(rtn, tiny_model):
    artifact, _, _ = obtain(rtn, "w2g32", tiny_model)
    os.remove(os.path.join(artifact.path, "rtn.safetensors"))
    with pytest.raises(QBenchError, match="rtn.safetensors is missing.*rm -r"):
        obtain(rtn, "w2g32", tiny_model)


def test_another_variants_file_copied_in_is_refused(rtn, tiny_model):
    """The same file name and a plausible size: only the checksum tells."""
    import shutil

    int8, _, _ = obtain(rtn, "w8g32", tiny_model)
    int4, _, _ = obtain(rtn, "w4g32", tiny_model)
    assert int4.files["rtn.safetensors"][1] != int8.files["rtn.safetensors"][1]
    shutil.copy(os.path.join(int4.path, "rtn.safetensors"), os.path.join(int8.path, "rtn.safetensors"))
    with pytest.raises(QBenchError, match=r"does not match its checksums \(rtn.safetensors (has|differs).*rm -r"):
        obtain(rtn, "w8g32", tiny_model)


def test_same_size_edit_and_extra_file_are_refused(rtn, tiny_model):
    artifact, _, _ = obtain(rtn, "w4g32", tiny_model)
    path = os.path.join(artifact.path, "rtn.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF  # one bit pattern in the last tensor byte: same size, other weights
    open(path, "wb").write(bytes(data))
    with pytest.raises(QBenchError, match="differs from what was written"):
        obtain(rtn, "w4g32", tiny_model)
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert obtain(rtn, "w4g32", tiny_model)[1]  # restored: a hit again, with the time the check took
    open(os.path.join(artifact.path, "extra.safetensors"), "wb").write(b"x")
    with pytest.raises(QBenchError, match="extra.safetensors was not part of the entry"):
        obtain(rtn, "w4g32", tiny_model)


def test_failed_quantization_leaves_no_entry(rtn, tiny_model):
    # group_size 256 does not divide the tiny model's 64 input features.
    with pytest.raises(ValueError, match="does not divide"):
        obtain(rtn, "bits=4,group_size=256", tiny_model)
    with pytest.raises(ValueError, match="does not divide"):
        obtain(rtn, "bits=4,group_size=256", tiny_model)  # not mistaken for a cached artifact


def test_cache_hit_follows_the_model_and_cache_to_their_current_folders(tiny_model, tmp_path, monkeypatch):
    import shutil

    fp = load_plugins(PluginSettings(allow=("builtin",))).backends["fp"]
    name, config = fp.parse_variant("bf16")
    first, hit, _ = obtain_artifact(fp, name, config, str(tiny_model), fingerprint(tiny_model), None, None)
    assert not hit
    moved_model = shutil.copytree(tiny_model, tmp_path / "moved-model")
    moved_cache = shutil.copytree(os.environ["QBENCH_CACHE"], tmp_path / "moved-cache")
    monkeypatch.setenv("QBENCH_CACHE", str(moved_cache))
    again, hit, _ = obtain_artifact(fp, name, config, str(moved_model), fingerprint(moved_model), None, None)
    assert hit and again.model_path == str(moved_model) and again.path.startswith(str(moved_cache))


def test_an_entry_copied_whole_from_another_variant_is_refused(rtn, tiny_model):
    """Copied with its own artifact.json, every checksum matches: only the
    manifest's identity (the key it was written under, what it holds) tells."""
    import shutil
    from pathlib import Path

    int8, _, key8 = obtain(rtn, "w8g32", tiny_model)
    int4, _, key4 = obtain(rtn, "w4g32", tiny_model)
    entry8, entry4 = Path(int8.path).parent, Path(int4.path).parent
    shutil.rmtree(entry8)
    shutil.copytree(entry4, entry8)
    with pytest.raises(QBenchError, match=rf"is not the entry asked for \(its manifest was written under key {key4} "
                                          rf"for rtn:w4g32, not under {key8}: it was copied from another entry\).*rm -r"):
        obtain(rtn, "w8g32", tiny_model)


def test_a_manifest_edited_to_match_its_new_key_still_names_what_it_holds(rtn, tiny_model):
    import json
    from pathlib import Path

    int8, _, key8 = obtain(rtn, "w8g32", tiny_model)
    int4, _, _ = obtain(rtn, "w4g32", tiny_model)
    manifest = Path(int4.path).parent / "artifact.json"
    data = json.loads(manifest.read_text())
    data["key"] = key8  # as if written under the other variant's key
    (Path(int8.path).parent / "artifact.json").write_text(json.dumps(data))
    for name in Path(int8.path).iterdir():
        name.unlink()
    for name in Path(int4.path).iterdir():
        (Path(int8.path) / name.name).write_bytes(name.read_bytes())
    with pytest.raises(QBenchError, match=r"its manifest holds config=.*'bits': 4.*this cell asks for .*'bits': 8"):
        obtain(rtn, "w8g32", tiny_model)


def test_two_processes_asking_for_one_entry_build_it_once(tiny_model, tmp_path):
    """The entry's lock: one process builds, the other waits and then uses
    the finished entry (after checking it)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = ("import sys; from qbench.cell.artifacts import obtain_artifact; from qbench.sdk.models import fingerprint; "
              "from qbench.sdk.registry import PluginSettings, load_plugins; "
              f"b = load_plugins(PluginSettings(plugin_dirs=({str(RTN_PLUGIN)!r},), allow=())).backends['rtn']; "
              "v, c = b.parse_variant('w4g32'); "
              f"a, hit, key = obtain_artifact(b, v, c, {str(tiny_model)!r}, fingerprint({str(tiny_model)!r}), None, None); "
              "print(hit, key)")
    env = {**os.environ, "QBENCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = sorted(p.communicate(timeout=300)[0].split() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert [o[0] for o in outputs] == ["False", "True"] and outputs[0][1] == outputs[1][1]
    entries = list((tmp_path / "cache" / "artifacts" / "rtn").iterdir())
    assert sorted(e.name for e in entries if e.is_dir()) == [outputs[0][1]]


def test_a_link_in_an_entry_is_refused_before_anything_reads_it(rtn, tiny_model, tmp_path):
    """A link could point at a device that never ends or at another entry's
    file: entries hold the plain files the backend wrote."""
    artifact, _, _ = obtain(rtn, "w8g32", tiny_model)
    target = os.path.join(artifact.path, "rtn.safetensors")
    os.replace(target, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", target)
    with pytest.raises(QBenchError, match=r"rtn.safetensors is a link, not a file the backend wrote.*rm -r"):
        obtain(rtn, "w8g32", tiny_model)
