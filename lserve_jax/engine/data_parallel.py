"""`DataParallelEngine`: M engine replicas over a (dp, tp) mesh, requests spread across them.

Each replica is an `Engine` on one row of the mesh (its `tensor_parallel_size` devices), with
its own KV pool, scheduler and prefix cache; a request lives on one replica from arrival to
finish. New requests go to the replica with the fewest unfinished requests (then the fewest
prompt tokens waiting or running, then the lowest index). `step` steps every replica that has
work, each in a thread of its own, so one replica's device calls run while another's host
bookkeeping does (JAX releases the GIL while it waits on a device); outputs come back in replica
order. The replicas load the checkpoint each and compile their own steps (their arrays live on
different devices).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Hashable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from lserve_jax import inputs
from lserve_jax.engine.engine import Engine
from lserve_jax.engine.outputs import RequestOutput
from models import parallel


class DataParallelEngine:
    """`data_parallel_size` replicas of `Engine(ckpt, tensor_parallel_size=..., **kwargs)` (see
    the module docstring); the same request API as `Engine`."""

    def __init__(self, ckpt: str | None = None, *, data_parallel_size: int,
                 tensor_parallel_size: int = 1, devices: Sequence | None = None, **kwargs):
        dp = inputs.check_int("data_parallel_size", data_parallel_size, minimum=1)
        tp = inputs.check_int("tensor_parallel_size", tensor_parallel_size, minimum=1)
        devices = list(jax.devices() if devices is None else devices)
        if dp * tp > len(devices):
            raise ValueError(f"data_parallel_size={dp} x tensor_parallel_size={tp} needs "
                             f"{dp * tp} devices; {len(devices)} are visible. On the CPU, set "
                             "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX "
                             "starts")
        self.mesh = Mesh(np.array(devices[:dp * tp]).reshape(dp, tp),
                         (parallel.DP_AXIS, parallel.TP_AXIS))
        self.replicas = [Engine(ckpt, tensor_parallel_size=tp, devices=list(row), **kwargs)
                         for row in self.mesh.devices]
        self.data_parallel_size = dp
        self._owner: dict[Hashable, int] = {}  # request id -> its replica
        self._threads = concurrent.futures.ThreadPoolExecutor(dp, "replica")

    def __getattr__(self, name):
        # What every replica shares (config, tokenizer, attention, limits, ...): replica 0's.
        if name.startswith("__") or name == "replicas":
            raise AttributeError(name)
        return getattr(self.replicas[0], name)

    # ---- requests --------------------------------------------------------------------------

    def _pick(self) -> int:
        def load(i):
            engine = self.replicas[i]
            return (engine.num_unfinished_requests(),
                    sum(len(p.prompt_ids) for p in engine._parents.values()), i)
        return min(range(len(self.replicas)), key=load)

    def add_request(self, request_id: Hashable | None, prompt,
                    sampling_params=None) -> Hashable:
        """`Engine.add_request` on the least loaded replica."""
        return self._add_request(request_id, prompt, sampling_params, None)

    def _add_request(self, request_id, prompt, sampling_params, name) -> Hashable:
        if request_id is not None and request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already waiting or running")
        index = self._pick()
        if request_id is None:  # ids unique across the replicas
            request_id = f"dp{index}-{next(self.replicas[index]._auto_ids)}"
        request_id = self.replicas[index]._add_request(request_id, prompt, sampling_params,
                                                       name)
        self._owner[request_id] = index
        return request_id

    def abort_request(self, request_id: Hashable) -> RequestOutput:
        return self.replicas[self._owner.pop(request_id)].abort_request(request_id)

    def step(self) -> list[RequestOutput]:
        """One step of every replica with unfinished requests (concurrently); their outputs."""
        busy = [e for e in self.replicas if e.has_unfinished_requests()]
        if len(busy) > 1:
            results = list(self._threads.map(Engine.step, busy))
        else:
            results = [e.step() for e in busy]
        outputs = [out for result in results for out in result]
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.replicas)

    def num_unfinished_requests(self) -> int:
        return sum(e.num_unfinished_requests() for e in self.replicas)

    run_until_done = Engine.run_until_done

    def reset_prefix_cache(self) -> int:
        return sum(e.reset_prefix_cache() for e in self.replicas)

    # ---- what the replicas hold together ---------------------------------------------------

    @property
    def _parents(self) -> dict:
        return {k: v for e in self.replicas for k, v in e._parents.items()}

    @property
    def counters(self) -> dict:
        return {k: sum(e.counters[k] for e in self.replicas) for k in self.replicas[0].counters}

    @property
    def compile_s(self) -> float:
        return sum(e.compile_s for e in self.replicas)

    def stats(self) -> dict:
        """The replicas' counters and gauges, summed."""
        stats = [e.stats() for e in self.replicas]
        return {k: sum(s[k] for s in stats) for k in stats[0]}


def create_engine(ckpt: str | None = None, *, data_parallel_size: int = 1, **kwargs):
    """An `Engine`, or a `DataParallelEngine` for data_parallel_size > 1."""
    if data_parallel_size == 1:
        return Engine(ckpt, **kwargs)
    return DataParallelEngine(ckpt, data_parallel_size=data_parallel_size, **kwargs)
