"""lm-evaluation-harness task files with local data read into the same items
as qbench's own JSONL, and clear errors for what is not supported."""

import json
import textwrap

import pytest

from qbench.core.errors import QBenchError
from qbench.data.tasks import load_items
from tests.conftest import REPO

SUITES = REPO / "suites"


def test_example_task_reads_as_the_same_items_as_the_native_file():
    lm_eval = load_items(SUITES / "lm_eval" / "capitals_lm_eval.yaml", None)
    native = load_items(SUITES / "data" / "capitals.jsonl", 40)
    assert len(lm_eval) == 40
    for a, b in zip(lm_eval, native):
        assert (a["context"], a["choices"], a["gold"]) == (b["context"], b["choices"], b["gold"])
        # acc_norm divides by the choice's length without the delimiter, as lm-eval does.
        assert a["norm_lengths"] == [len(c) - 1 for c in b["choices"]]


def write_task(folder, body: str, docs=None):
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in (docs or [
        {"q": "Two plus two is", "opts": ["four", "five"], "label": "four"},
        {"q": "The sky is", "opts": ["green", "blue"], "label": "blue"}])))
    path = folder / "task.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_templates_field_names_and_text_targets(tmp_path):
    path = write_task(tmp_path, """
        task: t
        dataset_path: json
        data_files: docs.jsonl
        doc_to_text: "Q: {{q}}\\nA:"
        doc_to_choice: opts
        doc_to_target: label
        target_delimiter: "  "
    """)
    items = load_items(path, None)
    assert items[0] == {"context": "Q: Two plus two is\nA:", "choices": ["  four", "  five"], "gold": 0,
                        "norm_lengths": [4, 4]}
    assert items[1]["gold"] == 1
    assert len(load_items(path, 1)) == 1


@pytest.mark.parametrize("body,message", [
    ("dataset_path: hellaswag\ndoc_to_text: q\ndoc_to_choice: opts\ndoc_to_target: label\n", "not local data"),
    ("dataset_path: json\ndata_files: docs.jsonl\nprocess_docs: !function utils.process\n", "!function"),
    ("dataset_path: json\ndata_files: docs.jsonl\noutput_type: generate_until\n", "multiple_choice only"),
    ("dataset_path: json\ndata_files: missing.jsonl\ndoc_to_text: q\n", "not found"),
    ("dataset_path: json\ndata_files: docs.jsonl\ndoc_to_text: '{{nope}}'\ndoc_to_choice: opts\n"
     "doc_to_target: label\n", "document 1"),
    ("dataset_path: json\ndata_files: docs.jsonl\nnum_fewshot: 5\n", "zero-shot"),
])
def test_unsupported_or_broken_tasks_say_why(tmp_path, body, message):
    with pytest.raises(QBenchError, match=message):
        load_items(write_task(tmp_path, body), None)
