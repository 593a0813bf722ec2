"""Cells in parallel, one worker per GPU (``qbench run --gpus 0,1`` or ``all``).

Each GPU is a lane: a thread that starts the next cell's worker process
with ``CUDA_VISIBLE_DEVICES`` set to that GPU alone, waits for it, and takes
the next. A cell's measurement, latency included, therefore never shares a
GPU with another cell's. Only the main thread writes records: lanes hand
their outcome over a queue, and the main thread appends each record the
moment it arrives, so the results file stays append-only and a run stopped
halfway resumes like a serial one. Progress events travel the same queue, so
the reporter is only ever called from the main thread.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections.abc import Callable
from typing import Any, Optional, TypeVar

Item = TypeVar("Item")


class Relay:
    """A reporter for a lane (or a Ray task): puts its calls on a queue that
    the main thread reads and forwards to the real reporter."""

    def __init__(self, events: queue.Queue):
        self.events = events

    def cell_started(self, cell, index, total):
        self.events.put(("call", "cell_started", (cell, index, total)))

    def phase(self, cell, name):
        self.events.put(("call", "phase", (cell, name)))

    def cell_finished(self, cell, status, seconds, error):
        self.events.put(("call", "cell_finished", (cell, status, seconds, error)))

    def warn(self, message):
        self.events.put(("call", "warn", (message,)))


def run_cells(
    items: list[Item],
    gpus: list[str],
    work: Callable[[Item, Optional[str], Any], Any],
    finish: Callable[[Item, Any], None],
    reporter: Any,
    assign: Optional[Callable[[Item], Optional[str]]] = None,
) -> None:
    """``work`` then ``finish`` for every item: one after another in this
    thread on one GPU or none (``gpu`` is then that GPU or None), else
    spread over the GPUs by ``run_on_gpus``."""
    if len(gpus) > 1:
        run_on_gpus(items, gpus, work, finish, reporter, assign)
        return
    for item in items:
        finish(item, work(item, gpus[0] if gpus else None, reporter))


def run_on_gpus(
    items: list[Item],
    gpus: list[str],
    work: Callable[[Item, str, Any], Any],
    finish: Callable[[Item, Any], None],
    reporter: Any,
    assign: Optional[Callable[[Item], Optional[str]]] = None,
) -> None:
    """Run ``work(item, gpu, reporter)`` for every item, one at a time per
    GPU, and call ``finish(item, result)`` in this (the main) thread as each
    ends. ``assign(item)`` may pin an item to a GPU (a latency trial to the
    GPU that measured its cell); other items go to whichever GPU is free.
    An exception in ``work`` is a harness bug: the other lanes finish their
    current item, nothing more starts, and it is raised here. An exception
    here (Ctrl-C, a failing ``finish``) stops the lanes' worker processes at
    once: what they were measuring is lost, what was finished is kept."""
    events: queue.Queue = queue.Queue()
    shared: queue.Queue = queue.Queue()
    pinned: dict[str, queue.Queue] = {gpu: queue.Queue() for gpu in gpus}
    for item in items:
        gpu = assign(item) if assign else None
        (pinned[gpu] if gpu in pinned else shared).put(item)
    stop = threading.Event()

    def lane(gpu: str) -> None:
        relay = Relay(events)
        try:
            while not stop.is_set():
                try:
                    item = pinned[gpu].get_nowait()
                except queue.Empty:
                    try:
                        item = shared.get_nowait()
                    except queue.Empty:
                        return
                events.put(("done", item, work(item, gpu, relay)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            stop.set()
            events.put(("crashed", gpu, exc))
        finally:
            events.put(("lane-ended", gpu, None))

    threads = [threading.Thread(target=lane, args=(gpu,), name=f"qbench-gpu-{gpu}", daemon=True) for gpu in gpus]
    for thread in threads:
        thread.start()
    ended, crash = 0, None
    try:
        while ended < len(threads):
            kind, first, second = events.get()
            if kind == "call":
                getattr(reporter, first)(*second)
            elif kind == "done":
                finish(first, second)
            elif kind == "crashed":
                crash = crash or second
            else:
                ended += 1
    except BaseException:
        stop.set()
        # Lanes wait on worker processes that would otherwise run their cell
        # to the end (and the interpreter would wait for them at exit).
        for child in multiprocessing.active_children():
            child.terminate()
        raise
    if crash is not None:
        raise crash
