"""Provenance and output of benchmark records, and the memory bandwidth they are measured
against.

    python benchmarks/provenance.py [--small]

prints the Python and JAX versions, the devices, the device kind and its slug, the commit, and
the copy bandwidth measured now (`benchmarks/gpu_checks.sh` writes these lines to device.txt).

Copy bandwidth: a jitted `x + 1` over an f32 array of 2 GiB (256 MiB on CPU or with --small),
bytes read plus bytes written (2 * size) over the median wall time of 10 calls after a warm-up.
The array is donated, so each call rewrites it in place: no allocation (on CPU, page faults on
a fresh buffer would dominate) and nothing for XLA to fold away. It is the figure the
decode benchmarks report their bandwidth as a fraction of (no datasheet peaks): it is what a
kernel that streams its operands once can reach on this device, in this run. `copy_bandwidth`
takes it from `LSERVE_COPY_GBPS` when set (gpu_checks.sh measures it once for all benchmarks)
and measures it otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lserve_jax.provenance import git_commit  # noqa: E402

__all__ = ["copy_bandwidth", "device_slug", "emit", "git_commit", "measure_copy_bandwidth"]

COPY_ENV = "LSERVE_COPY_GBPS"
PROBE_BYTES = {True: 2 * 2**30, False: 256 * 2**20}  # by on_gpu


def emit(records: list, f, record: dict) -> None:
    """Keep a record, print it as one JSON line and append that line to the open file `f`,
    flushed, so a run that is killed keeps every record written before."""
    records.append(record)
    line = json.dumps(record)
    print(line, flush=True)
    f.write(line + "\n")
    f.flush()


def device_slug(device_kind: str) -> str:
    """File-name form of a device kind: "NVIDIA H200" -> "nvidia_h200", "cpu" -> "cpu"."""
    return re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_")


def measure_copy_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Copy bandwidth in GB/s: (read + written bytes) / median time of a jitted `x + 1` over an
    f32 array of `nbytes` (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((nbytes // 4,), jnp.float32)
    add = jax.jit(lambda a: a + 1, donate_argnums=0)
    x = jax.block_until_ready(add(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = jax.block_until_ready(add(x))
        times.append(time.perf_counter() - start)
    del x
    return 2 * (nbytes // 4 * 4) / statistics.median(times) / 1e9


def copy_bandwidth(on_gpu: bool) -> tuple[float, str, int | None]:
    """(GB/s, where it came from, probe bytes): `LSERVE_COPY_GBPS` if set, else measured now."""
    if os.environ.get(COPY_ENV):
        return float(os.environ[COPY_ENV]), COPY_ENV, None
    nbytes = PROBE_BYTES[on_gpu]
    return measure_copy_bandwidth(nbytes), "measured", nbytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="the CPU-sized probe array")
    args = parser.parse_args()

    import jax

    on_gpu = jax.default_backend() == "gpu"
    nbytes = PROBE_BYTES[on_gpu and not args.small]
    device = jax.devices()[0].device_kind
    print(f"python: {sys.version.split()[0]}")
    print(f"jax: {jax.__version__} ({jax.default_backend()})")
    print(f"devices: {jax.devices()}")
    print(f"device_kind: {device} (slug {device_slug(device)})")
    print(f"commit: {git_commit()}")
    gbps = measure_copy_bandwidth(nbytes)
    # gpu_checks.sh reads this line back: keep its form.
    print(f"copy_bandwidth_gbps: {gbps:.1f} (jitted x + 1 over a {nbytes / 2**30:.3g} GiB f32 "
          f"array: read + written bytes / median of 10 calls)")


if __name__ == "__main__":
    main()
