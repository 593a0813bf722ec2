"""lm-evaluation-harness as the task engine: qbench's lm-eval model gives
lm-eval's own numbers (checked against lm-eval's HF model on the same tiny
model), templates render in the sandbox, and task code runs only when the
run trusts it."""

import json
import textwrap
import time

import pytest
import torch

from qbench.core.errors import QBenchError
from tests.conftest import MC_ITEMS

pytest.importorskip("lm_eval")

MC_TASK = """
task: tiny_mc
dataset_path: json
dataset_kwargs: {data_files: {test: mc.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: gold
metric_list: [{metric: acc}, {metric: acc_norm}]
"""

GEN_ITEMS = [{"context": "One, two, three,", "answer": " four"}, {"context": "The sky is", "answer": " blue"},
             {"context": "def f(x):\n   ", "answer": " return x"}]
GEN_TASK = """
task: tiny_gen
dataset_path: json
dataset_kwargs: {data_files: {test: gen.jsonl}}
test_split: test
output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n", "."], max_gen_toks: 6, do_sample: false}
metric_list: [{metric: exact_match}]
"""


@pytest.fixture()
def task_folder(tmp_path):
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in MC_ITEMS))
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(i) + "\n" for i in GEN_ITEMS))
    (tmp_path / "mc.yaml").write_text(MC_TASK)
    (tmp_path / "gen.yaml").write_text(GEN_TASK)
    return tmp_path


def _suite(folder, body: str):
    from qbench.data.suites import load_suite

    path = folder / "suite.yaml"
    path.write_text(textwrap.dedent(body))
    return load_suite(str(path))


@pytest.fixture(scope="module")
def both(tiny_model):
    """lm-eval's HF model and qbench's over the same weights."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qbench.cell.lm_eval_engine import session_lm
    from qbench.sdk.hf import HFSession

    theirs = HFLM(pretrained=str(tiny_model), device="cpu", max_length=64, batch_size=3, dtype="float32")
    session = HFSession(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), "cpu")
    ours = session_lm(session, AutoTokenizer.from_pretrained(tiny_model), 64, 3)
    return theirs, ours


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_requests_score_as_lm_evals_hf_model(both):
    theirs, ours = both
    pairs = [(item["context"], choice) for item in MC_ITEMS for choice in item["choices"]]
    pairs.append(("", "Hello world"))  # empty context: the prefix token conditions
    pairs.append(("word " * 80, " end"))  # longer than max_length: cut on the left
    a = theirs.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    b = ours.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    assert [g for _, g in a] == [g for _, g in b]
    assert [lp for lp, _ in b] == pytest.approx([lp for lp, _ in a], abs=1e-4)
    # Not periodic text: lm-eval 0.4.13's batched rolling windows of a periodic
    # document ("x y z " * 40) gave -326.77 for a window it scores -326.08 alone.
    from pydoc_data.topics import topics

    docs = [("The quick brown fox. " * 12,), ("Short.",), (topics["assert"][:900],)]
    rolling_a = theirs.loglikelihood_rolling(_instances("loglikelihood_rolling", docs), disable_tqdm=True)
    rolling_b = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", docs), disable_tqdm=True)
    assert rolling_b == pytest.approx(rolling_a, rel=1e-5)
    requests = [(item["context"], {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}) for item in GEN_ITEMS]
    assert ours.generate_until(_instances("generate_until", requests)) == \
        theirs.generate_until(_instances("generate_until", requests), disable_tqdm=True)


def test_local_tasks_give_lm_evals_figures(both, task_folder):
    import lm_eval

    from qbench.cell.lm_eval_engine import evaluate, read_task_file

    theirs, ours = both
    suite = _suite(task_folder, """
        name: lm
        lm_eval: {tasks: [mc.yaml, gen.yaml], batch_size: 3}
    """)
    configs = [read_task_file(task_folder / name, suite, False) for name in ("mc.yaml", "gen.yaml")]
    reference = lm_eval.simple_evaluate(model=theirs, tasks=configs, log_samples=False,
                                      bootstrap_iters=suite.lm_eval.bootstrap_iters)["results"]
    got = evaluate(ours.session, ours.tokenizer, suite.lm_eval, suite, False, 64)
    for name in ("acc", "acc_norm"):
        assert got["tiny_mc"]["metrics"][name][0] == reference["tiny_mc"][f"{name},none"]
    assert got["tiny_mc"]["metrics"]["acc"][1] == pytest.approx(reference["tiny_mc"]["acc_stderr,none"])
    assert got["tiny_gen"]["metrics"]["exact_match"][0] == reference["tiny_gen"]["exact_match,none"]
    assert got["tiny_mc"]["samples"] == len(MC_ITEMS)


def test_task_templates_render_in_the_sandbox(both, task_folder):
    import lm_eval.utils

    from qbench.cell.lm_eval_engine import evaluate

    theirs, ours = both
    (task_folder / "evil.yaml").write_text(MC_TASK.replace("tiny_mc", "evil").replace(
        '"{{context}}"', '"{{ cycler.__init__.__globals__.os.system(\'touch pwned\') }}"'))
    suite = _suite(task_folder, "name: evil\nlm_eval: {tasks: [evil.yaml]}\n")
    plain = lm_eval.utils.env
    with pytest.raises(QBenchError, match="template was refused by the sandbox") as refused:
        evaluate(ours.session, ours.tokenizer, suite.lm_eval, suite, False, 64)
    assert "offline" not in str(refused.value)  # the file's problem: no hint about hub data
    assert lm_eval.utils.env is plain and not (task_folder / "pwned").exists()
    # A template that would build 995 million characters fails at its allocation, inside lm-eval too.
    (task_folder / "bomb.yaml").write_text(MC_TASK.replace("tiny_mc", "bomb").replace(
        '"{{context}}"', '"{{ (context*10)|list|join(context*29000) }}"'))
    suite = _suite(task_folder, "name: bomb\nlm_eval: {tasks: [bomb.yaml]}\n")
    started = time.perf_counter()
    with pytest.raises(QBenchError, match="refused by the sandbox .*(MiB to render|characters)"):
        evaluate(ours.session, ours.tokenizer, suite.lm_eval, suite, False, 64)
    assert time.perf_counter() - started < 30


def test_task_code_runs_only_when_trusted(tiny_model, task_folder, tmp_path):
    import qbench
    from qbench.execute.results import ResultStore

    (task_folder / "helpers.py").write_text("def doc_to_text(doc):\n    return doc['context']\n")
    (task_folder / "coded.yaml").write_text(MC_TASK.replace("tiny_mc", "coded").replace(
        'doc_to_text: "{{context}}"', "doc_to_text: !function helpers.doc_to_text"))
    (task_folder / "suite.yaml").write_text("name: coded\nlm_eval: {tasks: [coded.yaml], batch_size: 4}\n")
    options = dict(model=str(tiny_model), suite=str(task_folder / "suite.yaml"), backends=["fp:fp32"],
                   device="cpu", output_dir=str(tmp_path / "out"))
    with pytest.raises(QBenchError, match="--trust-task-code"):
        qbench.run(**options)
    df = qbench.run(**options, trust_task_code=True)
    record = ResultStore(df.attrs["run_dir"]).latest()["fp:fp32"]
    assert record.ok, record.error
    assert 0 <= record.tasks["lm_eval:coded"]["acc"].value <= 1
    assert record.tasks["lm_eval:coded"]["acc"].n == len(MC_ITEMS)


def test_the_native_multiple_choice_path_gives_lm_evals_numbers(tiny_model, task_folder, tmp_path):
    """Why qbench keeps its own multiple-choice scorer beside lm-eval: on the
    same task file, the same acc and acc_norm in one run, even with a BOS
    policy for perplexity (lm-eval's BOS rule applies to tasks)."""
    import qbench
    from qbench.execute.results import ResultStore

    items = [{"context": f"Question: what is {a} plus {b}?\nAnswer:", "choices": [f" {a + b}", f" {a * b + 1}",
                                                                           f" {a + b + 10}"], "gold": 0}
             for a in range(2, 8) for b in range(3, 8)]
    (task_folder / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (task_folder / "suite.yaml").write_text(textwrap.dedent("""
        name: both
        bos: document
        tasks: [{name: native, path: mc.yaml, batch_size: 4}]
        lm_eval: {tasks: [mc.yaml], batch_size: 4}
    """))
    df = qbench.run(model=str(tiny_model), suite=str(task_folder / "suite.yaml"), backends=["fp:fp32"],
                    device="cpu", output_dir=str(tmp_path / "out"))
    tasks = ResultStore(df.attrs["run_dir"]).latest()["fp:fp32"].tasks
    assert tasks["native"]["acc"].n == tasks["lm_eval:tiny_mc"]["acc"].n == 30
    for name in ("acc", "acc_norm"):
        assert tasks["native"][name].value == tasks["lm_eval:tiny_mc"][name].value


def test_native_tasks_follow_lm_evals_bos_rule_unless_the_suite_says_otherwise(tiny_model, task_folder):
    """bos: document used to prefix every multiple-choice request with BOS,
    which lm-eval does not do: a different number with no word why. Now the
    native tasks tokenize as lm-eval does unless ``task_bos: suite``."""
    from qbench.data.workload import Workload
    from qbench.sdk.hf import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    bos = tokenizer.bos_token_id
    body = "name: b\nbos: document\n{}tasks: [{{name: native, path: mc.yaml}}]\n"
    default = Workload(_suite(task_folder, body.format("")), tokenizer).tasks[0][2]
    suite_rule = Workload(_suite(task_folder, body.format("task_bos: suite\n")), tokenizer).tasks[0][2]
    assert bos is not None and all(w.input_ids[0] == bos for w in suite_rule)
    assert not any(w.input_ids[0] == bos for w in default)
    assert [w.input_ids[1:] for w in suite_rule] == [w.input_ids for w in default]


def test_generation_in_pieces_gives_lm_evals_text(both, monkeypatch):
    """generate_until decodes in pieces and stops after the piece with a stop
    string or EOS; the text is the one-go text, and lm-eval's."""
    import qbench.cell.lm_eval_engine as engine

    theirs, ours = both
    requests = [(item["context"], {"until": ["@@"], "max_gen_toks": 12, "do_sample": False}) for item in GEN_ITEMS]
    expected = theirs.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    monkeypatch.setattr(engine, "GENERATION_PIECE", 5)
    assert ours.generate_until(_instances("generate_until", requests)) == expected
    assert all(len(ours.tokenizer.encode(text)) > 5 for text in expected)  # several pieces were needed


def test_generations_with_prompts_of_one_length_decode_as_a_batch(both, monkeypatch):
    """Prompts with the same token count decode together (no padding, so
    each row is its one-request text), up to the batch size; lm-eval's text."""
    theirs, ours = both
    contexts = [f"Question: What is {a} plus {b}?\nAnswer:" for a, b in ((12, 34), (56, 21), (40, 17), (33, 3))]
    lengths = [len(ours.tok_encode(c)) for c in contexts]
    assert lengths[0] == lengths[1] == lengths[2] != lengths[3]
    requests = [(c, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}) for c in contexts]
    rows, generate = [], ours.session.generate
    monkeypatch.setattr(ours.session, "generate", lambda ids, n, on_token: rows.append(len(ids)) or
                        generate(ids, n, on_token))
    expected = theirs.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    assert ours.generate_until(_instances("generate_until", requests)) == expected
    assert sorted(rows) == [1, 3]
