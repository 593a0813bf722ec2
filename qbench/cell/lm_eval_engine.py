"""lm-evaluation-harness as a task engine: any lm-eval task, on any backend.

``SessionLM`` is an lm-eval model (``lm_eval.api.model.TemplateLM``) over a
qbench session. lm-eval owns the tasks (prompts, few-shot, filters, metrics
and their standard errors); qbench owns the tokens and the scoring: the
requests become qbench windows, scored by the same float32 log-softmax as
every other quality figure, and generation is the session's own greedy
decode. Tokenization follows lm-eval's Hugging Face model exactly (its BOS
rule: the tokenizer's own special tokens, the prefix token BOS else EOS), so
the numbers are the ones lm-eval prints for the same model.

Task files are code, and qbench keeps them from running any unless asked:
lm-eval renders ``doc_to_*`` templates with a plain jinja2 environment
(``lm_eval.utils.env``), which here is swapped for qbench's sandbox while a
cell evaluates; ``!function`` hooks (Python imported from the task's folder)
and datasets' ``trust_remote_code`` in a suite's own task files are refused
unless the run is started with ``--trust-task-code``. Tasks that ship with the
installed lm-eval (``lm_eval:NAME``) are library code, like lm-eval itself.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from qbench.core.errors import QBenchError
from qbench.data.lm_eval_tasks import FunctionTag, lm_eval_encode, load_task_yaml, prefix_token_id
from qbench.data.windows import Window, rolling_windows
from qbench.sdk.backend import Session, ignore_step

#: prefix of installed lm-eval tasks in a suite's ``lm_eval.tasks``
REGISTRY = "lm_eval:"
#: tokens generated between checks for a stop string (generate_until)
GENERATION_PIECE = 32


def _template_env():
    """qbench's sandbox, with what lm-eval's own environment adds
    (``regex_replace``, strict undefined variables, trailing newlines kept),
    so templates that render in lm-eval render the same here."""
    from lm_eval.utils import regex_replace

    from qbench.core.untrusted import template_environment

    env = template_environment()
    env.keep_trailing_newline = True
    env.filters["regex_replace"] = regex_replace
    return env


@contextlib.contextmanager
def sandboxed_templates() -> Iterator[None]:
    import lm_eval.utils

    saved = lm_eval.utils.env
    lm_eval.utils.env = _template_env()
    try:
        yield
    finally:
        lm_eval.utils.env = saved


@functools.cache
def _session_lm_class():
    """Built on first use: importing lm-eval is slow and it is an extra."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    from qbench.metrics.scoring import score_windows

    class SessionLM(TemplateLM):
        def __init__(self, session: Session, tokenizer, max_length: int, batch_size: int, max_gen_toks: int = 256):
            super().__init__()
            self.session, self.tokenizer = session, tokenizer
            self._max_length, self.batch_size, self.max_gen_toks = max_length, batch_size, max_gen_toks

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            return prefix_token_id(self.tokenizer)

        @property
        def max_length(self) -> int:
            return self._max_length

        def tok_encode(
            self,
            string: str,
            add_special_tokens: Optional[bool] = None,
            left_truncate_len: Optional[int] = None,
            **kwargs,
        ) -> list[int]:
            ids = (
                lm_eval_encode(self.tokenizer, string)
                if add_special_tokens is None
                else self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
            )
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def _score(self, windows: list[Window]) -> list[tuple[float, bool]]:
            scores = score_windows(self.session, windows, self.batch_size, greedy=True)
            logprobs, greedy = scores.tensor("token_logprobs").double(), scores.tensor("greedy")
            out, start = [], 0
            for window in windows:
                end = start + window.n_scored
                out.append((logprobs[start:end].sum().item(), bool(greedy[start:end].all())))
                start = end
            return out

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            windows = []
            for _, context, continuation in requests:
                # As lm-eval's HF model: at most max_length tokens fed, cut on the left.
                whole = (context + continuation)[-(self.max_length + 1) :]
                windows.append(Window(tuple(whole), min(len(continuation), len(whole) - 1), (0, 0)))
            return self._score(windows)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            documents = [self.tok_encode(request.args[0]) for request in requests]
            windows = rolling_windows(documents, self.max_length, self.prefix_token_id)
            per_window = self._score(windows)
            # Sum each document's windows (they come in document order).
            sums, index = [], 0
            for tokens in documents:
                total, count = 0.0, 0
                while count < len(tokens):
                    total += per_window[index][0]
                    count += windows[index].n_scored
                    index += 1
                sums.append(total)
            return sums

        def _finished(self, tokens: list[int], stops: list[str]) -> bool:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            return self.eot_token_id in tokens or any(stop in text for stop in stops)

        def _generate(self, prompts: list[list[int]], new_tokens: int, stops: list[list[str]]) -> list[list[int]]:
            """Greedy tokens for prompts of one length, decoded together (no
            padding, so each row is what it would be alone), in pieces of
            ``GENERATION_PIECE``. A row leaves the batch after the piece that
            brings EOS or one of its stop strings: the session's loop always
            decodes all it is asked, and a task's ``max_gen_toks`` (256 by
            default) is mostly past the answer. Each piece starts from the
            prompts plus the tokens so far (a fresh prefill)."""
            import torch

            tokens: list[list[int]] = [[] for _ in prompts]
            active = list(range(len(prompts)))
            while active:
                piece = min(GENERATION_PIECE, new_tokens - len(tokens[active[0]]))
                batch = torch.tensor([prompts[i] + tokens[i] for i in active])
                for i, row in zip(active, self.session.generate(batch, piece, ignore_step).tolist()):
                    tokens[i] += row
                active = [i for i in active if len(tokens[i]) < new_tokens and not self._finished(tokens[i], stops[i])]
            return tokens

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """lm-eval's HF model batches generations with left padding; the
            session has no padding mask, so requests are batched when their
            prompts have the same token count and generation settings
            (templated tasks mostly do), up to ``batch_size`` at a time."""
            eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
            prepared = []
            for request in requests:
                context, gen_kwargs = request.args
                kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
                if kwargs.get("do_sample"):
                    raise QBenchError(
                        "an lm-eval task asks for sampled generation; qbench decodes greedily "
                        "(set do_sample: false in the task's generation_kwargs)"
                    )
                until = [stop for stop in handle_stop_sequences(kwargs.pop("until", None), eos=eos) if stop]
                new_tokens = kwargs["max_gen_toks"]
                prepared.append(
                    (self.tok_encode(context, left_truncate_len=self.max_length - new_tokens), new_tokens, until)
                )
            groups: dict[tuple[int, int], list[int]] = {}
            for index, (ids, new_tokens, _) in enumerate(prepared):
                groups.setdefault((len(ids), new_tokens), []).append(index)
            out: list[str] = [""] * len(prepared)
            for (_, new_tokens), members in groups.items():
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start : start + self.batch_size]
                    generated = self._generate(
                        [prepared[i][0] for i in chunk], new_tokens, [prepared[i][2] for i in chunk]
                    )
                    for i, tokens in zip(chunk, generated):
                        out[i] = self._text(tokens, prepared[i][2])
            return out

        def _text(self, tokens: list[int], until: list[str]) -> str:
            # Generation in transformers stops at EOS; the session's loop does
            # not, so cut there, then at the first stop string.
            if self.eot_token_id in tokens:
                tokens = tokens[: tokens.index(self.eot_token_id)]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            return text

    return SessionLM


def session_lm(session: Session, tokenizer, max_length: int, batch_size: int, max_gen_toks: int = 256):
    return _session_lm_class()(session, tokenizer, max_length, batch_size, max_gen_toks)


def _has_function(value: Any) -> bool:
    if isinstance(value, FunctionTag):
        return True
    if isinstance(value, dict):
        return any(_has_function(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_function(v) for v in value)
    return False


def read_task_file(path: Path, suite, trust_task_code: bool, seen: Optional[set] = None) -> dict[str, Any]:
    """A suite's own lm-eval task file as a config dict for lm-eval, with its
    ``include`` chain merged (each file confined like any suite data) and its
    local data files made absolute (lm-eval would resolve them against the
    working directory). Code in it (``!function``, a dataset's
    ``trust_remote_code``) is refused unless ``trust_task_code``."""

    seen = seen or set()
    if path in seen:
        raise QBenchError(f"{path}: include cycle")
    seen.add(path)
    config = load_task_yaml(path)
    if _has_function(config):
        if not trust_task_code:
            raise QBenchError(
                f"{path}: '!function' runs Python from the task's folder: run with "
                "--trust-task-code if you trust this task file"
            )
        from lm_eval.tasks._yaml_loader import load_yaml

        config = load_yaml(path, resolve_func=True, recursive=False)
    if (config.get("dataset_kwargs") or {}).get("trust_remote_code") and not trust_task_code:
        raise QBenchError(
            f"{path}: dataset_kwargs.trust_remote_code runs the dataset's own script: run with "
            "--trust-task-code if you trust it"
        )
    merged: dict[str, Any] = {}
    includes = config.pop("include", None)
    for name in includes if isinstance(includes, list) else [includes] if includes else []:
        merged.update(read_task_file(suite.resolve(str(path.parent / name)), suite, trust_task_code, seen))
    merged.update(config)
    files = (merged.get("dataset_kwargs") or {}).get("data_files")
    if merged.get("dataset_path") in ("json", "csv", "parquet", "text") and files:

        def local(name: str) -> str:
            return str(suite.resolve(str(path.parent / name)))

        merged["dataset_kwargs"] = {
            **merged["dataset_kwargs"],
            "data_files": (
                {split: ([local(f) for f in v] if isinstance(v, list) else local(v)) for split, v in files.items()}
                if isinstance(files, dict)
                else [local(f) for f in files]
                if isinstance(files, list)
                else local(files)
            ),
        }
    if "task" not in merged:
        raise QBenchError(f"{path}: an lm-eval task file needs a 'task' name")
    return merged


#: dataset loader of ``datasets`` for each local file type
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def installed_task_with_local_data(name: str, data: Path) -> dict[str, Any]:
    """An installed lm-eval task's config (its prompts, ``process_docs``,
    filters and metrics: library code, like lm-eval itself) with the split it
    evaluates read from a local file instead of its hub dataset."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = TaskManager().task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise QBenchError(f"lm-eval has no task '{name}' defined by a task file (see `lm-eval ls tasks`)")
    config = load_yaml(entry.yaml_path, resolve_func=True, recursive=True)
    if "task" not in config or "group" in config:
        raise QBenchError(f"lm_eval:{name} is a group of tasks: give local_data for each of its tasks instead")
    if data.suffix not in LOCAL_FORMATS:
        raise QBenchError(f"local data {data}: use a {', '.join(LOCAL_FORMATS)} file")
    split = config.get("test_split") or config.get("validation_split") or "test"
    config.update(
        task=name,
        dataset_path=LOCAL_FORMATS[data.suffix],
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(data)}},
    )
    return config


def task_specs(spec, suite, trust_task_code: bool) -> list[Any]:
    """What ``lm_eval.simple_evaluate`` takes: installed task names (or their
    configs, with local data), and config dicts for the suite's own task files."""
    out: list[Any] = []
    for entry in spec.tasks:
        if entry.startswith(REGISTRY):
            name = entry[len(REGISTRY) :]
            local = spec.local_data.get(name)
            out.append(installed_task_with_local_data(name, suite.resolve(local)) if local else name)
        else:
            out.append(read_task_file(suite.resolve(entry), suite, trust_task_code))
    return out


def evaluate(
    session: Session, tokenizer, spec, suite, trust_task_code: bool, max_length: int
) -> dict[str, dict[str, Any]]:
    """Run the suite's lm-eval tasks on the session. Returns, per task, its
    metrics as lm-eval reports them: ``{metric: (value, stderr)}``, plus the
    number of samples and the task's config version."""
    import lm_eval
    from jinja2.sandbox import SecurityError
    from lm_eval.tasks import TaskManager

    model = session_lm(session, tokenizer, max_length, spec.batch_size, spec.max_gen_toks)
    specs = task_specs(spec, suite, trust_task_code)
    with sandboxed_templates():
        try:
            results = lm_eval.simple_evaluate(
                model=model,
                tasks=specs,
                num_fewshot=spec.num_fewshot,
                limit=spec.limit,
                task_manager=TaskManager(),
                log_samples=False,
                bootstrap_iters=spec.bootstrap_iters,
                random_seed=0,
                numpy_random_seed=0,
                torch_random_seed=0,
                fewshot_random_seed=0,
            )
        except QBenchError:
            raise
        except SecurityError as exc:  # a task template the sandbox refused: the file's problem, not the data's
            raise QBenchError(
                f"an lm-eval task template was refused by the sandbox ({exc}): task templates may "
                "only read the document's fields"
            ) from None
        except Exception as exc:  # lm-eval's own errors: an unknown task, a dataset it cannot load
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise QBenchError(
                f"lm-eval could not run the suite's tasks: {type(exc).__name__}: {first} (offline, "
                "give the task local_data: {{TASK: file}} or use a task file with local data)"
            ) from None
    out: dict[str, dict[str, Any]] = {}
    for task, figures in (results or {}).get("results", {}).items():
        metrics = {}
        for key, value in figures.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = figures.get(f"{name}_stderr,{filt}")
            label = name if filt == "none" else f"{name}[{filt}]"
            metrics[label] = (
                float(value),
                float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
            )
        out[task] = {
            "metrics": metrics,
            "samples": (results.get("n-samples") or {}).get(task, {}).get("effective"),
            "version": (results.get("versions") or {}).get(task),
        }
    return out
