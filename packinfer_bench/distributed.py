"""Work on several processes through torch.distributed: a job runs on N ranks of this machine started by
torchrun's launcher (torch.distributed's elastic agent, called in-process by `packinfer-bench run`; the same job
by hand: `torchrun --standalone --nproc_per_node N -m packinfer_bench.distributed JOB`, the line the log shows);
each rank joins the process group (NCCL on GPUs, one GPU a rank; gloo on CPUs) and calls the job's function.

A job is a pickled file: the function to call ("module:function", called as function(world, **kwargs)) and its
arguments. On the lent GPU machines NCCL must keep NVLink multicast off (it can take the host's shared GPUs out of
service): every launch on CUDA, and every rank before it joins, sets NCCL_ENV where the user has not set it."""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packinfer_bench.errors import PackinferBenchError

#: NVLink multicast off in NCCL, PyTorch's symmetric memory and NVSHMEM (the lent machines' device notes).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
#: How long a rank waits in a collective for the others (a rank that died ends the job sooner).
TIMEOUT = datetime.timedelta(minutes=30)


def keep_multicast_off(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set NCCL_ENV's variables in `env` (default: this process's environment) where they are not set; returns
    `env`."""
    target: Any = os.environ if env is None else env
    for key, value in NCCL_ENV.items():
        target.setdefault(key, value)
    return target


@dataclass(frozen=True)
class World:
    """This process's rank among `size` (a single process: rank 0 of 1); rank 0 is the writer, the only one that
    writes to the run folder."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def from_writer(self, make: Callable[[], Any]) -> Any:
        """make() computed on rank 0 and handed to every rank (what the ranks must agree on: what is done, what
        the scheduler uses)."""
        value = [make() if self.writer else None]
        if self.size > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(value, src=0)
        return value[0]

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


def init_world(cuda: bool) -> World:
    """Join the process group torchrun's environment describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    NCCL with this rank's GPU (cuda:LOCAL_RANK made current) when `cuda`, else gloo."""
    import torch
    import torch.distributed as dist

    rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if cuda:
        keep_multicast_off()
        if local >= torch.cuda.device_count():
            raise PackinferBenchError(f"rank {rank}: no GPU {local} (torch sees {torch.cuda.device_count()})")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return World(rank, size, local)


def close_world() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Job:
    """What every rank runs: target(world, **kwargs), on the GPUs (`cuda`) or the CPU."""

    target: str  # "package.module:function"
    kwargs: dict[str, Any] = field(default_factory=dict)
    cuda: bool = False

    def call(self, world: World) -> Any:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(world, **self.kwargs)


def torchrun_command(nproc: int, job_file: Path) -> list[str]:
    """The torchrun line that runs a job file on `nproc` ranks of this machine (what launch does)."""
    return ["torchrun", "--standalone", "--nproc_per_node", str(nproc), "-m", "packinfer_bench.distributed",
            str(job_file)]


def launch(job: Job, nproc: int, job_file: Path, log: Callable[[str], None] = print) -> None:
    """Run `job` on `nproc` ranks as torchrun --standalone does (rendezvous on localhost, no restarts) and wait for
    them; the job file is written first and removed after. The ranks get this process's environment, with
    NCCL_ENV on CUDA and one CPU thread each unless set. A rank that fails fails the launch: PackinferBenchError
    (its traceback is on stderr)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    job_file.parent.mkdir(parents=True, exist_ok=True)
    with open(job_file, "wb") as f:
        pickle.dump(job, f)
    extra = {**(NCCL_ENV if job.cuda else {}), "OMP_NUM_THREADS": "1"}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"packinfer-{os.getpid()}-"
                          f"{time.time_ns()}", rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    log(f"{nproc} ranks ({'nccl' if job.cuda else 'gloo'}), as: {' '.join(torchrun_command(nproc, job_file))}")
    try:
        with _launcher_side_effects_undone(extra):
            elastic_launch(config, entrypoint=sys.executable)("-m", "packinfer_bench.distributed", str(job_file))
    except SignalException as e:  # the agent stopped the ranks on a signal sent to this process
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise PackinferBenchError(f"{job.target} on {nproc} ranks: rank {rank} failed (exit status "
                                  f"{failure.exitcode}; its traceback is above); --resume continues from what was "
                                  "stored") from None
    finally:
        job_file.unlink(missing_ok=True)


_SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, name)]


@contextlib.contextmanager
def _launcher_side_effects_undone(defaults: dict[str, str]) -> Iterator[None]:
    """os.environ with `defaults` set where unset (the ranks inherit it) for the block; afterwards the environment
    and the signal handlers as they were (the elastic agent, made for a process of its own, changes both)."""
    env, handlers = dict(os.environ), {sig: signal.getsignal(sig) for sig in _SIGNALS}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(env)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _exit_with_parent(poll_s: float = 0.5) -> None:
    """End this rank when the process that started it is gone. torchrun's agent starts each rank in a session of
    its own, so a SIGKILL of `run` (a time limit) would leave the ranks running on, appending to part files that
    the next --resume merges and removes, and holding their GPUs; a watcher thread sees the parent change."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """A rank of a job (started by torchrun): join the group, run the job, leave."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: torchrun --standalone --nproc_per_node N -m packinfer_bench.distributed JOB_FILE")
    import torch

    if not torch.cuda.is_available():  # before unpickling the job imports triton: its interpreter (as `run` does)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _exit_with_parent()
    with open(args[0], "rb") as f:
        job: Job = pickle.load(f)  # a file this harness wrote for its own ranks
    world = init_world(job.cuda)
    try:
        job.call(world)
        world.barrier()
    finally:
        close_world()


if __name__ == "__main__":
    main()
