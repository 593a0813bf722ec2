"""Fake backends for the runner's failure-isolation tests, loaded through
``--plugins-dir`` exactly as a user's one-off plugin would be."""

from __future__ import annotations

import os
import signal
import time
from typing import Literal, Optional

from qbench import hookimpl
from qbench.sdk.backend import Backend, Session, VariantConfig


class FakeConfig(VariantConfig):
    #: "flaky": loads once, then raises (a marker file in $QBENCH_FAKE_MARKER_DIR)
    #: "lose-node": the first load kills the Ray worker that runs the cell (a
    #: node lost mid-cell), the next one loads normally
    #: "queued": uniform, and decodes like the compiled runtime (steps timed
    #: as they finish, handed to the harness after the last one)
    #: "disk-full": uniform, until the latency phase meets a full disk (ENOSPC)
    #: "hang-in-latency": uniform, until the latency phase hangs (the cell times out)
    behaviour: Literal["ok", "raise", "exit", "hang", "slow", "uniform", "flaky", "queued",
                       "lose-node", "disk-full", "hang-in-latency"] = "ok"
    #: what the variant promises; "liar" promises 4 bits but loads fp32
    claims_bits: Optional[float] = None

    def nominal_bits(self):
        return self.claims_bits


class UniformSession(Session):
    """Logits all equal: perplexity must be exactly the vocabulary size."""

    def __init__(self, vocab: int, queued_step_seconds: Optional[float] = None):
        self.vocab, self.queued_step_seconds = vocab, queued_step_seconds

    def logits(self, input_ids, attention_mask):
        import torch

        return torch.zeros(*input_ids.shape, self.vocab)

    def generate(self, input_ids, max_new_tokens, on_token):
        import torch

        if self.queued_step_seconds is None:
            for _ in range(max_new_tokens):
                on_token()
        else:
            finished = []
            for _ in range(max_new_tokens):
                time.sleep(self.queued_step_seconds)
                finished.append(time.perf_counter())
            for at in finished:
                on_token(at)
        return torch.zeros(input_ids.shape[0], max_new_tokens, dtype=torch.long)

    def weight_bytes(self):
        return 0

    def describe(self):
        return {}

    def close(self):
        pass


class DiskFullSession(UniformSession):
    """Uniform through the quality phases; the disk fills up when the
    latency phase begins (the harness switches the runtime first)."""

    hang = False

    def use_runtime(self, runtime, compile_mode="max-autotune"):
        import errno

        if self.hang:
            time.sleep(3600)
        raise OSError(errno.ENOSPC, "No space left on device", "/full/disk/machine_canary.json")


class Fake(Backend):
    name = "fake"
    description = "test double: full precision, or a scripted failure"
    config_class = FakeConfig

    def variants(self):
        named = {b: FakeConfig(behaviour=b)
                 for b in ("ok", "raise", "exit", "hang", "slow", "uniform", "flaky", "queued", "lose-node",
                           "disk-full", "hang-in-latency")}
        return {**named, "liar": FakeConfig(claims_bits=4)}

    def quantize(self, model_path, config, calibration, workdir):
        if os.environ.get("QBENCH_FAKE_MARKER_DIR"):  # which process built it, and its parent
            with open(os.path.join(os.environ["QBENCH_FAKE_MARKER_DIR"], "builds"), "a") as log:
                log.write(f"{config.behaviour} {os.getpid()} {os.getppid()}\n")
        if os.environ.get("QBENCH_FAKE_BUILD_FAILS"):
            from qbench.core.errors import QBenchError

            raise QBenchError("scripted failure while building the artifact")
        return {}

    def load(self, artifact, device):
        behaviour = artifact.config["behaviour"]
        if os.environ.get("QBENCH_FAKE_MARKER_DIR"):  # which process started this worker (the fork server)
            with open(os.path.join(os.environ["QBENCH_FAKE_MARKER_DIR"], "loads"), "a") as log:
                log.write(f"{behaviour} {os.getppid()} {os.getpid()}\n")
        if behaviour == "raise":
            raise RuntimeError("scripted failure in load")
        if behaviour == "exit":
            os._exit(3)
        if behaviour == "hang":
            time.sleep(3600)
        if behaviour == "flaky":
            marker = os.path.join(os.environ["QBENCH_FAKE_MARKER_DIR"], "flaky-loaded")
            if os.path.exists(marker):
                raise RuntimeError("scripted failure in a second load")
            open(marker, "w").close()
        if behaviour == "lose-node":
            ray_worker = ray_worker_pid()
            if ray_worker is None:
                raise RuntimeError("lose-node runs only inside a Ray task")
            marker = os.path.join(os.environ["QBENCH_FAKE_MARKER_DIR"], "node-lost")
            if not os.path.exists(marker):
                open(marker, "w").close()
                # the Ray task relays this worker's phase messages as they
                # come; on a loaded machine it may not have read "load" yet,
                # and a loss then reports an earlier phase (CI saw "prepare")
                time.sleep(2)
                os.kill(ray_worker, signal.SIGKILL)
                time.sleep(60)  # die with it (the worker's parent-death signal)
        if behaviour == "slow":
            time.sleep(float(os.environ.get("QBENCH_FAKE_SLOW_SECONDS", "3")))
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from qbench.sdk.hf import HFSession

        if behaviour in ("disk-full", "hang-in-latency"):
            session = DiskFullSession(AutoConfig.from_pretrained(artifact.model_path).vocab_size)
            session.hang = behaviour == "hang-in-latency"
            return session
        if behaviour in ("uniform", "queued"):
            return UniformSession(AutoConfig.from_pretrained(artifact.model_path).vocab_size,
                                  0.02 if behaviour == "queued" else None)
        model = AutoModelForCausalLM.from_pretrained(artifact.model_path, dtype=torch.float32)
        return HFSession(model, device)


def ray_worker_pid() -> Optional[int]:
    """The Ray worker process above this cell's worker, if any: killing it
    is what losing its node does to a cell."""
    import psutil

    for ancestor in psutil.Process().parents():
        if ancestor.cmdline() and ancestor.cmdline()[0].startswith("ray::"):
            return ancestor.pid
    return None


@hookimpl
def register_backends(register):
    register(Fake())
