"""Shared fixtures: a tiny random Llama with its own tokenizer, a tiny suite,
and isolation from the user's caches and installed third-party plugins."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FAKE_PLUGINS = HERE / "fake_plugins"
RTN_PLUGIN = REPO / "examples" / "rtn_plugin"


def _isolate(patch: pytest.MonkeyPatch, tmp_path_factory) -> None:
    patch.setenv("QBENCH_PLUGINS", "builtin")
    patch.delenv("QBENCH_BLOCK_PLUGINS", raising=False)
    patch.delenv("QBENCH_PLUGINS_DIR", raising=False)
    patch.setenv("QBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    patch.setenv("QBENCH_RESULTS", str(tmp_path_factory.mktemp("results")))
    patch.setenv("TOKENIZERS_PARALLELISM", "false")
    patch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def isolated_session(tmp_path_factory):
    """Module- and session-scoped fixtures are set up before any test's own
    isolation: they get a cache of their own too."""
    with pytest.MonkeyPatch.context() as patch:
        _isolate(patch, tmp_path_factory)
        yield


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """Tests never load installed third-party plugins nor touch the user's cache."""
    _isolate(monkeypatch, tmp_path_factory)


def _train_tokenizer(folder: Path) -> None:
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:20]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)


def make_tiny_model(folder: Path, hidden: int = 64, intermediate: int = 128) -> Path:
    """A randomly initialised 2-layer Llama saved as an HF folder, with the
    trained byte-level tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _train_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # Larger than default init so the model is far from uniform and quantization noise shows.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """hidden 64: small enough for every CPU test."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def wide_tiny_model(tmp_path_factory) -> Path:
    """Input features divisible by 128, as tinygemm's int4 packing and
    quanto's int4 groups need."""
    return make_tiny_model(tmp_path_factory.mktemp("wide-tiny"), hidden=256, intermediate=512)


@pytest.fixture(scope="session")
def builtin_backends():
    """qbench's own backends, as a run with QBENCH_PLUGINS=builtin loads them."""
    from qbench.sdk.registry import PluginSettings, load_plugins

    return load_plugins(PluginSettings(allow=("builtin",))).backends


@pytest.fixture(scope="session")
def wide_reference(wide_tiny_model):
    """The wide tiny model's fp32 baseline on shared evaluation tokens:
    (windows, top-64 reference, its weight bytes)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qbench.data.windows import make_windows
    from qbench.metrics.scoring import reference_from, score_windows
    from qbench.sdk.hf import HFSession

    base = HFSession(AutoModelForCausalLM.from_pretrained(wide_tiny_model, dtype=torch.float32), "cpu")
    windows = make_windows([(i * 5) % 380 for i in range(300)], 64, None, "none", None)
    return windows, reference_from(score_windows(base, windows, 2, top_k=64)), base.weight_bytes()


@pytest.fixture(scope="session")
def tied_model(wide_tiny_model, tmp_path_factory):
    """The wide tiny model with its output head tied to the embeddings, as
    SmolLM2 has: safetensors stores the shared tensor once."""
    import shutil

    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tied")
    for item in wide_tiny_model.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy(item, folder / item.name)
    model = AutoModelForCausalLM.from_pretrained(wide_tiny_model, tie_word_embeddings=True)
    model.tie_weights()
    model.save_pretrained(folder)
    return folder


def mean_kld(session, reference) -> float:
    """Mean per-token KLD of a session against a ``wide_reference``."""
    from qbench.metrics.scoring import score_windows

    windows, ref, _ = reference
    return score_windows(session, windows, 2, reference=ref).tensor("kld").mean().item()


MC_ITEMS = [
    {"context": "Question: What is 2 + 2?\nAnswer:", "choices": [" 4", " 5", " 22"], "gold": 0},
    {"context": "The sky is", "choices": [" blue", " green"], "gold": 0},
    {"context": "One, two,", "choices": [" three", " seven", " ten"], "gold": 0},
    {"context": "Cats and", "choices": [" dogs", " tables"], "gold": 0},
]


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("suite")
    (folder / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in MC_ITEMS))
    path = folder / "tiny.yaml"
    path.write_text(textwrap.dedent("""
        name: tiny
        bos: none
        perplexity:
          corpus: {source: "builtin:pydoc-topics", documents: [0.0, 0.5]}
          max_tokens: 300
          max_length: 64
          batch_size: 3
        fidelity: {top_k: 32}
        tasks:
          - {name: mc, path: mc.jsonl}
        generation:
          prompts: ["The assert statement", "Class definitions"]
          max_new_tokens: 5
        latency: {prompt_tokens: 16, new_tokens: 4, warmup: 1, min_reps: 2, min_seconds: 0}
        calibration:
          corpus: {source: "builtin:pydoc-topics", documents: [0.5, 1.0]}
          samples: 2
          seq_len: 32
    """))
    return path


def session_for(backend, spec: str, model: Path, calibration=None):
    """Quantize ``model`` with ``backend:spec`` (through the artifact cache)
    and load it on the CPU, as a worker does."""
    return load_on(backend, spec, model, "cpu", calibration)


def load_on(backend, spec: str, model: Path, device: str, calibration=None):
    """``session_for`` on ``device``."""
    from qbench.cell.artifacts import obtain_artifact
    from qbench.sdk.models import fingerprint

    variant, config = backend.parse_variant(spec)
    config = backend.for_device(config, device)
    calibration_hash = "test" if calibration is not None else None
    artifact, _, _ = obtain_artifact(backend, variant, config, str(model), fingerprint(model), calibration,
                                     calibration_hash)
    return backend.load(artifact, device)


def make_record(**fields):
    """A valid ``CellRecord`` with placeholder identity, for tests of code
    that reads records."""
    from qbench.core.records import CellRecord

    base = {"run_id": "test", "cell": "fp:fp32", "backend": "fp", "variant": "fp32", "device": "cpu",
            "model": {"name": "m", "fingerprint": "f", "source": "local"},
            "suite": {"name": "s", "path": "s.yaml", "hash": "h"}, "status": "ok"}
    return CellRecord.model_validate({**base, **fields})
