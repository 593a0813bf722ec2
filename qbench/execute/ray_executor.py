"""Cells as Ray tasks: ``qbench run --executor ray [--address ADDR]``.

Each job (a cell, or one latency trial of it) is a Ray task that asks for
the cell's resources (GPUs, CPUs, optionally memory) and runs in a fresh
Ray worker process (``max_calls=1``); inside it the cell's usual worker
process does the measuring, so a crash, an out-of-memory kill or a hang is
the cell's failed record, exactly as on one machine. Progress events come
back through a Ray queue; results come back as the tasks end, and the
driver alone appends them to ``results.jsonl``, so ``--resume`` works with
either executor.

Files: with ``shared`` every node reads the model, the suite and the run
folder at the driver's paths (a shared file system: the only way for models
too large to copy). With ``ship`` they travel through Ray's object store
(qbench.execute.shipping) and what a worker writes comes back with its result.
``auto`` is ``shared`` on a cluster qbench starts on this machine, else
``ship`` for a model folder under ``SHIP_LIMIT`` and ``shared`` above it.

A task whose Ray worker or node is lost gives a failed record naming the
node, and is retried once, on another node where there is one.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from qbench.core.errors import QBenchError
from qbench.core.parallel import Relay
from qbench.core.records import CellRecord
from qbench.execute.results import PLAN_FILE, cell_file_stem
from qbench.execute.runner import Job, RunPlan, WorkerResult, run_worker

FILES_MODES = ("auto", "shared", "ship")
#: ``auto`` ships model folders up to this size through the object store
SHIP_LIMIT = 4 * 2**30
#: environment variable through which a worker learns (and records) its node
NODE_VARIABLE = "QBENCH_RAY_NODE"


def ship_paths(plan: RunPlan) -> list[Path]:
    """What a cell reads from the driver's disk, for ``ship``."""
    data = [Path(p) for p in plan.suite_files]
    task_folders = [p.parent for p in data if p.suffix in (".yaml", ".yml")]
    return [Path(plan.model.path), Path(plan.suite_path), *data, *task_folders, *(Path(d) for d in plan.plugin_dirs)]


def relocated(plan: RunPlan, root: Path) -> RunPlan:
    """The plan with the driver's paths moved under a node's unpacked root."""
    from qbench.execute.shipping import under

    model = plan.model.model_copy(update={"path": str(under(root, plan.model.path))})
    return plan.model_copy(
        update={
            "model": model,
            "suite_path": str(under(root, plan.suite_path)),
            "plugin_dirs": [str(under(root, d)) for d in plan.plugin_dirs],
        }
    )


def ray_job(
    plan_json: str,
    run_dir: str,
    job: dict[str, Any],
    mode: str,
    static: Optional[dict[str, bytes]],
    run_files: dict[str, bytes],
    events,
) -> dict[str, Any]:
    """The body of a Ray task: one job's worker on this node."""
    import ray

    from qbench.core.cells import CellSpec
    from qbench.execute import shipping

    node = ray.get_runtime_context().get_node_id()
    events.put(("started", job["key"], node))
    os.environ[NODE_VARIABLE] = node  # the worker copies this environment and records it
    plan = RunPlan.model_validate_json(plan_json)
    cell = CellSpec.model_validate(job["cell"])
    relay = Relay(events)
    if mode == "ship":
        plan = relocated(plan, shipping.unpack(static or {}))
        local = Path(tempfile.mkdtemp(prefix=f"qbench-{plan.run_id}-"))
        shipping.write_run_files(local, run_files)
    else:
        local = Path(run_dir)
        if not (local / PLAN_FILE).is_file():
            return {
                "outcome": (
                    "error",
                    {
                        "phase": "start",
                        "error": (
                            f"node {node[:12]} cannot read the run folder {run_dir}: put results on storage every node "
                            "shares (-o), or use --ray-files ship"
                        ),
                    },
                ),
                "started": time.time(),
                "log": str(local / "logs" / (cell_file_stem(cell.cell) + ".log")),
                "node": node,
            }
    result = run_worker(plan, local, cell, relay, job["latency_trial"])
    out = {"outcome": result.outcome, "started": result.started, "log": str(result.log), "node": node}
    if mode == "ship":
        out["files"] = shipping.changed_run_files(local, run_files, result.log)
        import shutil

        shutil.rmtree(local, ignore_errors=True)
    return out


def check_reachable(address: Optional[str], timeout: float = 5.0) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) nobody answers at:
    Ray itself retries such an address for minutes before giving up."""
    import socket

    if not address or address == "auto" or ":" not in address:
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except ValueError:
        raise QBenchError(f"--address {address} is not host:port (or ray://host:port, or auto)") from None
    except OSError as exc:
        raise QBenchError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}): start it with "
            "`ray start --head`, or check --address"
        ) from None


class RayExecutor:
    """Runs jobs as Ray tasks on the cluster at ``address`` (None: start one
    on this machine, with ``local_resources`` such as ``num_gpus`` for a
    cluster of logical GPUs). ``task_gpus``/``task_cpus``/``task_memory``
    override what each task asks for (default: one GPU per cell on CUDA;
    ``--threads`` CPUs, else on the CPU as many CPUs as the smallest node
    has, so that on a uniform cluster CPU latency is never measured beside
    another cell)."""

    def __init__(
        self,
        address: Optional[str] = None,
        files: str = "auto",
        cache_dir: Optional[str] = None,
        task_memory: Optional[int] = None,
        task_gpus: Optional[float] = None,
        task_cpus: Optional[float] = None,
        local_resources: Optional[dict[str, Any]] = None,
    ):
        if files not in FILES_MODES:
            raise QBenchError(f"--ray-files takes {', '.join(FILES_MODES)}, not '{files}'")
        from importlib.util import find_spec

        if find_spec("ray") is None:
            raise QBenchError("--executor ray needs Ray: pip install 'qbench[ray]'")
        if address:
            check_reachable(address)
        self.address, self.files, self.cache_dir = address, files, cache_dir
        self.task_memory, self.task_gpus, self.task_cpus = task_memory, task_gpus, task_cpus
        self.local_resources = local_resources or {}
        self.ready = False
        self.started_cluster = False
        self.phases: dict[str, str] = {}

    # -- starting --------------------------------------------------------------------------------------------

    def _start(self, plan: RunPlan) -> None:
        if self.ready:
            return
        import ray
        from ray.util.queue import Queue

        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.address,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                    **({} if self.address else self.local_resources),
                )
            except (ConnectionError, ValueError, RuntimeError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise QBenchError(
                    f"cannot reach the Ray cluster at {self.address} ({first}): start it with "
                    "`ray start --head`, or check --address"
                ) from None
            self.started_cluster = True
        self.mode = self._files_mode(plan)
        self.resources = self._task_resources(plan)
        self._check_feasible()
        self.events = Queue()
        self.static = None
        if self.mode == "ship":
            from qbench.execute import shipping

            self.static = ray.put(shipping.pack(ship_paths(plan)))
        # a fresh Ray worker process per job, as each cell gets a fresh process on one machine
        self.remote = ray.remote(max_calls=1)(ray_job)
        self.ready = True

    def _files_mode(self, plan: RunPlan) -> str:
        if self.files != "auto":
            return self.files
        if not self.address:
            return "shared"  # a cluster on this machine sees its files
        size = sum(p.stat().st_size for p in Path(plan.model.path).rglob("*") if p.is_file())
        return "ship" if size <= SHIP_LIMIT else "shared"

    def _task_resources(self, plan: RunPlan) -> dict[str, Any]:
        import ray

        gpus = (
            self.task_gpus
            if self.task_gpus is not None
            else (float(plan.gpus_per_cell) if plan.device == "cuda" else 0.0)
        )
        if self.task_cpus is not None:
            cpus = self.task_cpus
        elif plan.threads:
            cpus = float(plan.threads)
        elif plan.device == "cuda":
            cpus = 1.0
        else:
            # the smallest worker node's CPUs (a head started with --num-cpus 0 holds no cells)
            cpus = min(
                (cpu for n in ray.nodes() if n["Alive"] and (cpu := n["Resources"].get("CPU", 0.0)) > 0), default=1.0
            )
        out: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
        if self.task_memory:
            out["memory"] = self.task_memory
        return out

    def _check_feasible(self) -> None:
        """Ray would wait forever for a task no node can hold: refuse now."""
        import ray

        wanted = {
            "CPU": self.resources["num_cpus"],
            "GPU": self.resources["num_gpus"],
            "memory": self.resources.get("memory", 0),
        }
        if not any(
            all(node["Resources"].get(name, 0.0) >= amount for name, amount in wanted.items() if amount)
            for node in ray.nodes()
            if node["Alive"]
        ):
            asked = ", ".join(f"{amount:g} {name}" for name, amount in wanted.items() if amount)
            raise QBenchError(
                f"no node of the Ray cluster has what one cell asks for ({asked}): add such a "
                "node, or lower --threads, --gpus-per-cell or --cell-memory"
            )

    # -- running ---------------------------------------------------------------------------------------------

    def run(
        self,
        plan: RunPlan,
        run_dir: Path,
        jobs: list[Job],
        finish: Callable[[Job, WorkerResult], None],
        reporter,
        alone: bool = False,
        placed: Optional[Callable[[Job], Optional[str]]] = None,
    ) -> None:
        if not jobs:
            return
        self._start(plan)
        for batch in [[job] for job in jobs] if alone else [jobs]:
            self._run_batch(plan, run_dir, batch, finish, reporter, placed)

    def _run_batch(self, plan, run_dir, jobs, finish, reporter, placed) -> None:
        import ray

        counts = {"started": 0, "total": len(jobs)}  # a retry adds one to both
        waiting: dict[Any, tuple[str, Job, int, float]] = {}  # ref -> (key, job, attempt, submitted)
        nodes: dict[str, str] = {}  # key -> node it started on
        by_key = {str(i): job for i, job in enumerate(jobs)}
        plan_json = plan.model_dump_json()

        def submit(key: str, job: Job, attempt: int, node: Optional[str] = None, avoid: Optional[str] = None):
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            from qbench.execute.shipping import read_run_files

            target = node or (self._other_node(avoid) if avoid else None)
            options: dict[str, Any] = {**self.resources, "max_retries": 0}
            if target:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=target, soft=True)
            if self.cache_dir:
                options["runtime_env"] = {"env_vars": {"QBENCH_CACHE": self.cache_dir}}
            run_files = read_run_files(run_dir) if self.mode == "ship" else {}
            spec = {"key": key, "cell": job.cell.model_dump(), "latency_trial": job.latency_trial}
            ref = self.remote.options(**options).remote(
                plan_json, str(run_dir), spec, self.mode, self.static, run_files, self.events
            )
            waiting[ref] = (key, job, attempt, time.time())

        def relay_events() -> None:
            for kind, first, second in self._drain():
                if kind == "started":
                    nodes[first] = second
                    counts["started"] += 1
                    reporter.cell_started(by_key[first].label, counts["started"], counts["total"])
                else:
                    if first == "phase":
                        self.phases[second[0]] = second[1]
                    getattr(reporter, first)(*second)

        for key, job in by_key.items():
            submit(key, job, 0, node=placed(job) if placed else None)
        try:
            while waiting:
                relay_events()
                done, _ = ray.wait(list(waiting), num_returns=1, timeout=0.25)
                for ref in done:
                    key, job, attempt, submitted = waiting.pop(ref)
                    try:
                        value = ray.get(ref)
                    except ray.exceptions.RayTaskError:
                        raise  # an exception in qbench's own task code: a harness bug
                    except ray.exceptions.RayError as exc:
                        relay_events()
                        finish(job, self._lost(run_dir, job, nodes.get(key), exc, submitted, retry=attempt == 0))
                        if attempt == 0:
                            counts["total"] += 1
                            submit(key, job, 1, avoid=nodes.get(key))
                        continue
                    relay_events()
                    log = run_dir / "logs" / (cell_file_stem(job.cell.cell) + ".log")
                    if "files" in value:
                        from qbench.execute.shipping import receive_run_files

                        receive_run_files(run_dir, value["files"], log)
                    else:
                        log = Path(value["log"])
                    finish(job, WorkerResult(tuple(value["outcome"]), value["started"], log))
        except BaseException:
            for ref in waiting:
                ray.cancel(ref, force=True)
            raise

    def _drain(self) -> list[tuple]:
        from ray.util.queue import Empty

        events = []
        while True:
            try:
                events.append(self.events.get_nowait())
            except Empty:
                return events

    def _lost(
        self, run_dir: Path, job: Job, node: Optional[str], exc: Exception, submitted: float, retry: bool
    ) -> WorkerResult:
        phase = self.phases.get(job.cell.cell, "start")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        where = f" on node {node[:12]}" if node else ""
        why = f"the Ray task running it was lost{where} during {phase} ({type(exc).__name__}: {first[:200]})" + (
            "; retried once on another node" if retry else "; already retried once"
        )
        log = run_dir / "logs" / (cell_file_stem(job.cell.cell) + ".log")
        return WorkerResult(("error", {"phase": phase, "error": why}), submitted, log)

    def _other_node(self, avoid: str) -> Optional[str]:
        """An alive node other than ``avoid`` that can hold a task."""
        import ray

        for node in ray.nodes():
            if (
                node["Alive"]
                and node["NodeID"] != avoid
                and all(
                    node["Resources"].get(name, 0.0) >= amount
                    for name, amount in (("CPU", self.resources["num_cpus"]), ("GPU", self.resources["num_gpus"]))
                )
            ):
                return node["NodeID"]
        return None

    def placement(self, record: CellRecord) -> Optional[str]:
        """The Ray node that measured a record (None when measured without Ray)."""
        return (record.env or {}).get("ray_node_id")

    def close(self) -> None:
        if self.started_cluster:
            import ray

            ray.shutdown()
            self.started_cluster = False
        self.ready = False
