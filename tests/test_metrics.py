"""Metrics with known answers."""

import math

import pytest
import torch

from qbench.core.errors import QBenchError
from qbench.data.tasks import request_windows
from qbench.data.windows import make_windows
from qbench.metrics.choice import accuracy_metrics
from qbench.metrics.generation import generation_metrics
from qbench.metrics.quality import fidelity_metrics, perplexity_metrics
from qbench.metrics.scoring import kl_against_topk, reference_from, score_windows
from qbench.sdk.backend import Session
from qbench.sdk.hf import HFSession
from tests.conftest import make_record


class FixedLogits(Session):
    """Logits from a function of the input ids."""

    def __init__(self, fn):
        self.fn = fn

    def logits(self, input_ids, attention_mask):
        return self.fn(input_ids)

    def generate(self, input_ids, max_new_tokens, on_token):
        raise NotImplementedError

    def weight_bytes(self):
        return 0


def load_tiny(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_uniform_logits_give_perplexity_equal_to_vocab_size():
    vocab = 37
    session = FixedLogits(lambda ids: torch.zeros(*ids.shape, vocab))
    windows = make_windows([i % vocab for i in range(100)], max_length=16, stride=None, bos_policy="none", bos_id=None)
    lp = score_windows(session, windows, batch_size=3).tensor("token_logprobs")
    n_bytes, n_words = 250, 40
    m = perplexity_metrics(lp, n_bytes=n_bytes, n_words=n_words)
    assert m["perplexity"]["value"] == pytest.approx(vocab, rel=1e-6)
    assert m["perplexity"]["stderr"] == pytest.approx(0.0, abs=1e-9)
    n = lp.numel()
    assert n == sum(w.n_scored for w in windows) == 100 - math.ceil(100 / 16)
    # bits per byte and word perplexity by hand: every token costs ln(37) nats.
    assert m["bits_per_byte"]["value"] == pytest.approx(n * math.log(vocab) / (n_bytes * math.log(2)))
    assert m["word_perplexity"]["value"] == pytest.approx(math.exp(n * math.log(vocab) / n_words))
    assert m["byte_perplexity"]["value"] == pytest.approx(math.exp(n * math.log(vocab) / n_bytes))


def test_hand_computed_kld_and_fidelity():
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.4, 0.2]], dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)  # 0.02527...
    kld, tail = kl_against_topk(p.log(), torch.tensor([[0, 1, 2]]), q.log())  # q at the same ids
    assert kld.item() == pytest.approx(expected, rel=1e-5)
    assert tail.item() == pytest.approx(0.0, abs=1e-6)
    # top-2 of P with the rest merged: KL over {0, 1, rest} = same here, since the rest is one token.
    kld2, tail2 = kl_against_topk(p.log()[:, :2], torch.tensor([[0, 1]]), q.log()[:, :2])
    assert kld2.item() == pytest.approx(expected, rel=1e-5)
    assert tail2.item() == pytest.approx(0.2, rel=1e-5)


def test_topk_kld_is_a_lower_bound_that_tightens_with_k():
    torch.manual_seed(1)
    logp = torch.log_softmax(torch.randn(50, 100) * 2, -1)
    logq = torch.log_softmax(torch.randn(50, 100) * 2, -1)
    exact = (logp.exp() * (logp - logq)).sum(-1)
    previous = torch.zeros(50)
    for k in (1, 5, 20, 100):
        values, ids = logp.topk(k, -1)
        approx, _ = kl_against_topk(values, ids, logq.gather(-1, ids))
        assert torch.all(approx <= exact + 1e-5)
        assert torch.all(approx >= previous - 1e-5)
        previous = approx
    assert torch.allclose(previous, exact, atol=1e-5)


def test_baseline_against_itself_is_perfect(tiny_model):
    session = HFSession(load_tiny(tiny_model), "cpu")
    windows = make_windows(list(range(3, 200)), 32, None, "none", None)
    base = score_windows(session, windows, 4, top_k=400)
    ref = reference_from(base)
    again = score_windows(session, windows, 4, reference=ref)
    m = fidelity_metrics(again.tensor("token_logprobs"), ref.token_logprobs, again.tensor("kld"),
                         again.tensor("same_top"), again.tensor("tail_mass"), 400)
    assert m["kld"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert m["same_top_p"]["value"] == 1.0
    assert m["delta_p"]["value"] == pytest.approx(0.0, abs=1e-7)
    assert m["delta_p_rms"]["value"] == pytest.approx(0.0, abs=1e-7)
    assert m["ln_ppl_ratio"]["value"] == pytest.approx(0.0, abs=1e-7)


def test_perplexity_matches_transformers_loss_on_the_same_window(tiny_model):
    model = load_tiny(tiny_model)
    ids = list(range(5, 69))
    windows = make_windows(ids, max_length=64, stride=None, bos_policy="none", bos_id=None)
    assert len(windows) == 1
    lp = score_windows(HFSession(model, "cpu"), windows, 1).tensor("token_logprobs")
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert perplexity_metrics(lp, 1, 1)["perplexity"]["value"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_results_do_not_depend_on_batch_size(tiny_model):
    session = HFSession(load_tiny(tiny_model), "cpu")
    # 150 tokens in windows of 64 leave a short last window, so batches need padding.
    windows = make_windows(list(range(7, 157)), 64, None, "none", None)
    assert len({len(w.input_ids) for w in windows}) > 1
    one = score_windows(session, windows, 1).tensor("token_logprobs")
    three = score_windows(session, windows, 3).tensor("token_logprobs")
    assert torch.allclose(one, three, atol=1e-4)


def test_sliding_window_scores_every_token_once():
    windows = make_windows(list(range(1000)), max_length=128, stride=32, bos_policy="none", bos_id=None)
    spans = [w.span for w in windows]
    assert spans[0][0] == 1 and spans[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(len(w.input_ids) <= 128 for w in windows)


def test_bos_policies():
    tokens = list(range(10, 20))
    every = make_windows(tokens, 4, None, "window", bos_id=1)
    assert all(w.input_ids[0] == 1 for w in every)
    assert sum(w.n_scored for w in every) == 10  # every corpus token scored
    doc = make_windows(tokens, 4, None, "document", bos_id=1)
    assert doc[0].input_ids[0] == 1 and doc[1].input_ids[0] != 1
    with pytest.raises(QBenchError, match="has none"):
        make_windows(tokens, 4, None, "window", bos_id=None)


def test_multiple_choice_split_and_accuracy(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    items = [{"context": "The sky is ", "choices": ["blue", "a colour"], "gold": 0},
             {"context": "One two", "choices": [" three", " x"], "gold": 1}]
    windows = request_windows(tok, items, bos_id=None)
    # The trailing space moves from the context into the choice, and only the choice is scored.
    whole = tok("The sky is blue", add_special_tokens=False)["input_ids"]
    ctx = tok("The sky is", add_special_tokens=False)["input_ids"]
    assert windows[0].input_ids == tuple(whole) and windows[0].n_scored == len(whole) - len(ctx)
    # Scripted log-likelihoods per choice. Item 1: "blue" wins on the sum (gold), but per
    # character "a colour" (-3/8) beats "blue" (-2/4). Item 2: " three" wins both ways (wrong).
    per_window = [-2.0, -3.0, -1.0, -1.5]
    lp = torch.cat([torch.full((w.n_scored,), v / w.n_scored) for w, v in zip(windows, per_window)])
    m = accuracy_metrics(items, lp, windows)
    assert m["acc"]["value"] == 0.5
    assert m["acc"]["stderr"] == pytest.approx(math.sqrt(0.25 / 1))
    assert m["acc_norm"]["value"] == 0.0
    assert m["acc_norm"]["stderr"] == 0.0


def test_generation_metrics():
    m = generation_metrics([[1, 2, 3], [4, 5, 9]], [[1, 2, 3], [4, 6, 9]])
    assert m["gen_exact_match"]["value"] == 0.5
    assert m["gen_common_prefix"]["value"] == pytest.approx((3 + 1) / 2)


def test_latency_trials_combine_into_a_geometric_mean_with_a_between_process_error():
    from qbench.metrics.trials import add_trial, busy_notes, combine_trials, trial_workload

    def trial(ms, busy=False):
        return {"prefill_ms": {"value": 2 * ms, "unit": "ms", "samples": [2 * ms]},
                "decode_ms_per_token": {"value": ms, "unit": "ms/token", "samples": [ms - 1, ms, ms + 1]},
                "generate_ms": {"value": 9 * ms, "unit": "ms", "samples": [9 * ms]},
                "latency_workload": {"batch_size": 2, "new_tokens": 4, "repetitions": 1},
                "machine_canary_ms": {"value": 30.0 if busy else 10.0, "unit": "ms", "typical": 10.0, "busy": busy}}

    one = combine_trials([trial(40.0)])
    assert one["decode_ms_per_token"]["value"] == 40.0 and "stderr" not in one["decode_ms_per_token"]
    # Trials at 40 and 90 ms: geometric mean 60; SD of the logs ln(90/40)/sqrt(2);
    # standard error 60 * that / sqrt(2) = 60 * ln(2.25) / 2 = 24.33.
    two = combine_trials([trial(40.0), trial(90.0)])
    decode = two["decode_ms_per_token"]
    assert decode["value"] == pytest.approx(60.0) and decode["stderr"] == pytest.approx(60 * math.log(2.25) / 2)
    assert decode["trials"] == [40.0, 90.0] and decode["n"] == 6 and decode["p90"] == pytest.approx(90.5)
    assert two["decode_tokens_per_s"]["value"] == pytest.approx(2000 / 60)  # batch 2
    assert two["decode_tokens_per_s"]["stderr"] == pytest.approx(2000 / 60 * math.log(2.25) / 2)
    workload = trial_workload([trial(40.0), trial(90.0)])
    assert workload["repetitions"] == 2 and workload["trials"] == 2
    # A busy trial is left out while a quiet one exists, and noted only when none does.
    mixed = combine_trials([trial(40.0), trial(90.0, busy=True)])
    assert mixed["decode_ms_per_token"]["value"] == 40.0
    assert trial_workload([trial(40.0), trial(90.0, busy=True)])["trials_left_out_busy"] == 1
    assert not busy_notes(mixed)
    busy = [trial(90.0, busy=True)]
    latency = combine_trials(busy)
    record = make_record(metrics=latency, notes=["other"] + busy_notes(latency), latency_trials=busy)
    assert len(record.notes) == 2 and "200% slower" in record.notes[1]
    record = add_trial(record, trial(40.0))
    assert record.notes == ["other"] and record.value("decode_ms_per_token") == 40.0
    assert len(record.latency_trials) == 2 and record.latency_workload["trials"] == 1


def test_top1_agreement_without_a_full_argmax_matches_argmax_exactly():
    from qbench.metrics.scoring import agrees_with_top1

    generator = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 4.0, 20.0):  # flat to peaked distributions: decided by the gathered values or not
        logits = torch.randn(300, 1000, generator=generator) * scale
        logits[:20, :5] = logits[:20, :1]  # ties with the top-1's own value
        lp = logits.log_softmax(-1)
        # The reference's top-k: of a perturbed distribution, so top-1s agree only partly.
        ref_ids = (logits + torch.randn(300, 1000, generator=generator) * scale).topk(32, dim=-1).indices
        lq = lp.gather(-1, ref_ids)
        expected = lp.argmax(-1) == ref_ids[:, 0]
        assert torch.equal(agrees_with_top1(lp, lq, ref_ids), expected)
        assert 0 < expected.sum() < 300 or scale == 0.1


def test_roofline_is_bytes_per_step_over_time_against_the_peak(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    from qbench.metrics.roofline import refresh, roofline_metrics, run_bandwidth

    workload = {"prompt_tokens": 100, "new_tokens": 20, "batch_size": 2}
    out = roofline_metrics(10**9, 1000, workload, decode_ms=10.0, bandwidth={"bytes_per_s": 200e9})
    per_step = 10**9 + 1000 * 110 * 2  # weights once; each sequence's KV at the mean context, 100 + 20/2
    assert out["decode_bandwidth_bytes_per_s"]["bytes_per_step"] == per_step
    assert out["roofline_fraction"]["value"] == pytest.approx(per_step / 0.010 / 200e9)
    # A trial that halves the decode time doubles the fraction.
    metrics = {**out, "decode_ms_per_token": {"value": 5.0}}
    assert refresh(metrics)["roofline_fraction"]["value"] == pytest.approx(2 * out["roofline_fraction"]["value"])
    # The tiny Llama: 2 layers x 2 KV heads x head_dim 16 x (key + value) x 4 bytes.
    session = HFSession(AutoModelForCausalLM.from_pretrained(tiny_model), "cpu")
    assert session.kv_bytes_per_position() == 2 * 2 * 16 * 2 * 4
    # Its input embedding is not the output head: a step reads one row of it,
    # not the table. Tied, the head reads the whole table every step.
    vocab, hidden = session.model.config.vocab_size, session.model.config.hidden_size
    assert session.unread_weight_bytes() == vocab * hidden * 4
    tied = AutoModelForCausalLM.from_pretrained(tiny_model)
    tied.lm_head.weight = tied.get_input_embeddings().weight
    assert HFSession(tied, "cpu").unread_weight_bytes() == 0
    # The peak is measured once per run and shared by every cell.
    first = run_bandwidth(tmp_path, "cpu")
    assert first["bytes_per_s"] > 1e8 and run_bandwidth(tmp_path, "cpu") == first


def test_switching_runtime_counts_as_backend_time():
    """A runtime switch can reload the model (ONNX Runtime opens a second
    session for its CUDA graphs): the clock books it to the backend, not to
    the harness's share."""
    import time

    from qbench.metrics.cost import BackendClock

    class SlowSwitch(FixedLogits):
        def use_runtime(self, runtime, compile_mode="max-autotune"):
            time.sleep(0.2)
            return None if runtime == "compiled" else "no"

    clock = BackendClock(SlowSwitch(lambda ids: ids))
    assert clock.use_runtime("compiled") is None and clock.use_runtime("other") == "no"
    assert clock.seconds >= 0.4


def test_harness_share_leaves_out_every_canary_gate_of_the_sweep(monkeypatch):
    """Phases 2 s + 10 s, of which the canary waited 3 s at batch 1 and 1 s at
    batch 8 (a sweep's second measurement has its own gate), the backend 6 s:
    the harness took 12 - 4 - 6 = 2 s of the 8 s measured."""
    from types import SimpleNamespace

    from qbench.cell.worker import CellPipeline

    pipeline = CellPipeline.__new__(CellPipeline)
    pipeline.metrics, pipeline.phase_seconds = {}, {"perplexity": 2.0, "latency": 10.0, "load": 50.0}
    pipeline.session = SimpleNamespace(seconds=6.0)
    pipeline.gate_seconds = 0.0
    pipeline.suite = SimpleNamespace(latency=None)
    pipeline.task = SimpleNamespace(run_dir="run", cell="c", device="cpu")
    pipeline.config = SimpleNamespace(runtime="eager")
    gates = iter((3.0, 1.0))
    monkeypatch.setattr("qbench.cell.worker.gated_latency",
                        lambda *a, **k: {"machine_canary_ms": {"gate_seconds": next(gates)}})
    pipeline.gated("prompt at batch 1")
    pipeline.gated("prompt at batch 8")
    pipeline.harness_share()
    share = pipeline.metrics["harness_share"]
    assert share["value"] == pytest.approx(2.0 / 8.0) and share["seconds"] == pytest.approx(2.0)
