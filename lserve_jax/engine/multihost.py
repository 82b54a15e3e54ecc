"""Several hosts: one JAX program over every host's devices, one host scheduling for all.

Every process starts the same way (`initialize`: `jax.distributed.initialize` with the
coordinator's address, the process count and this process's id, from flags or the
environment), builds the same `Engine` (the checkpoint loaded on each host, the weights and KV
pools placed over the global mesh), and then:

    process 0 (the leader)  runs the scheduler, the requests and the API; before each device
                            call it sends the call (which step, its static arguments and its
                            `StepBatch`) to the others (`Leader.announce`)
    every other process     runs `follow(engine)`: receives each call and runs the same
                            compiled step on its own devices, until the leader says stop

JAX runs one program on every process (multi-controller SPMD): each call must be made by all of
them with the same inputs, which is what the followers' loop does. The messages are pickled and
sent with `multihost_utils.broadcast_one_to_all` (a collective over the processes, padded to a
power-of-two size so few shapes compile). On the CPU the collectives are Gloo's
(`jax_cpu_collectives_implementation="gloo"`), which is how the tests run two processes on
127.0.0.1; on GPUs JAX uses NCCL.

Launch (each host, or each process of one host):

    python -m lserve_jax.generate --tensor-parallel-size 2 --num-processes 2 --process-id 0 \
        --coordinator-address 10.0.0.1:1234 --prompt "..."     # leader: prints the text
    python -m lserve_jax.generate --tensor-parallel-size 2 --num-processes 2 --process-id 1 \
        --coordinator-address 10.0.0.1:1234 --prompt "..."     # follower: exits when done

or the same with `lserve_jax.serve` (only the leader opens the port). The environment variables
LSERVE_COORDINATOR_ADDRESS, LSERVE_NUM_PROCESSES and LSERVE_PROCESS_ID stand in for the flags.
"""

from __future__ import annotations

import logging
import os
import pickle

import jax
import numpy as np

log = logging.getLogger("lserve_jax")

ENV = {"coordinator_address": "LSERVE_COORDINATOR_ADDRESS",
       "num_processes": "LSERVE_NUM_PROCESSES", "process_id": "LSERVE_PROCESS_ID"}
MIN_MESSAGE_BYTES = 4096
STOP = "stop"


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> dict | None:
    """The multi-process settings from the arguments, else the environment; None for a
    single process. ValueError for an incomplete or inconsistent set."""
    values = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
    for name, var in ENV.items():
        if values[name] is None and os.environ.get(var):
            values[name] = os.environ[var] if name == "coordinator_address" else int(
                os.environ[var])
    if values["num_processes"] in (None, 1) and values["process_id"] in (None, 0):
        return None
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise ValueError(f"several processes need {', '.join(missing)} (flags --"
                         + ", --".join(m.replace("_", "-") for m in missing) + " or "
                         + ", ".join(ENV[m] for m in missing) + ")")
    if not 0 <= values["process_id"] < values["num_processes"]:
        raise ValueError(f"process_id={values['process_id']} must be in "
                         f"[0, num_processes={values['num_processes']})")
    return values


def initialize(values: dict, local_devices: int | None = None) -> None:
    """Join the processes (`jax.distributed.initialize`) before JAX starts its backends; on
    the CPU with `local_devices` host devices each and Gloo collectives."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_devices:
        jax.config.update("jax_num_cpu_devices", local_devices)
    jax.distributed.initialize(values["coordinator_address"],
                               num_processes=values["num_processes"],
                               process_id=values["process_id"])
    log.info("process %d of %d: %d local devices, %d in all", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def is_leader() -> bool:
    return jax.process_index() == 0


def _broadcast(payload: bytes | None) -> bytes:
    """The leader's bytes on every process (the others pass None)."""
    from jax.experimental import multihost_utils

    size = np.array([len(payload) if payload is not None else 0], np.int64)
    size = int(multihost_utils.broadcast_one_to_all(size)[0])
    padded = max(MIN_MESSAGE_BYTES, 1 << (size - 1).bit_length())
    buffer = np.zeros(padded, np.uint8)
    if payload is not None:
        buffer[:size] = np.frombuffer(payload, np.uint8)
    return multihost_utils.broadcast_one_to_all(buffer)[:size].tobytes()


def announce(message) -> None:
    """Leader: send a message (a device call, or STOP) to every follower."""
    _broadcast(pickle.dumps(message))


def receive():
    """Follower: the leader's next message."""
    return pickle.loads(_broadcast(None))


def fetch(tree):
    """Replicated outputs of a device call as NumPy arrays on this process (an array spread
    over several processes is not addressable as a whole: read this process's copy). One
    process: one `jax.device_get` of the whole tree, so the copies overlap."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))
                        if isinstance(x, jax.Array) and not x.is_fully_addressable
                        else jax.device_get(x), tree)


def follow(engine) -> int:
    """Run the leader's device calls on this process until it says stop; returns how many
    calls ran."""
    calls = 0
    while True:
        message = receive()
        if message == STOP:
            return calls
        engine.execute(*message)
        calls += 1
