"""OpenAI-compatible server: `python -m lserve_jax.serve [--ckpt PATH] [--port 8000]`.

Serves /v1/models, /v1/completions and /v1/chat/completions (streaming or not), /health and
/metrics (lserve_jax/server/app.py) with uvicorn, on 127.0.0.1 unless --host says otherwise.
Without --ckpt it serves the embedded SmolLM2-135M-Instruct. It loads the model, warms up the
compiled steps of short requests (logged with their times) and only then opens the port and
logs "ready". SIGINT or SIGTERM stops it gracefully: no new connections are taken, requests in
flight get up to --shutdown-timeout seconds to finish, what still runs is aborted, exit 0.
Every engine flag of `lserve_jax.generate` applies (attention mode, dtype, sparsity knobs,
memory budget, max-num-seqs, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time

import uvicorn

from lserve_jax.engine import multihost
from lserve_jax.generate import add_engine_arguments, engine_kwargs, start_devices

log = logging.getLogger("lserve_jax.server")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lserve_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="converted checkpoint dir, HF checkpoint dir, or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the checkpoint's name)")
    p.add_argument("--max-pending-requests", type=int, default=1024,
                   help="requests waiting or running at once; past it the server answers 503")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                   help="larger request bodies are refused with 413")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight get to finish on SIGINT / SIGTERM")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="compile on first use instead of before opening the port")
    add_engine_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log compiles and requests")
    return p


def warm_up(engine) -> float:
    """Run short requests through the engine once (their prefill and decode steps compile);
    returns the seconds it took."""
    from lserve_jax.sampling import SamplingParams

    t0 = time.perf_counter()
    for n in (1, min(engine.max_num_seqs, 4)):
        ids = [engine.add_request(None, [1 + i] * 8, SamplingParams(
            max_tokens=2 + engine.num_scheduler_steps, temperature=0, ignore_eos=True))
            for i in range(n)]
        engine.run_until_done(ids)
    engine.reset_prefix_cache()
    return time.perf_counter() - t0


def default_model_name(ckpt: str | None) -> str:
    if ckpt is None:
        return "SmolLM2-135M-Instruct"
    from pathlib import Path

    return Path(ckpt).expanduser().name.removesuffix(".gguf")


def build_server(args: argparse.Namespace):
    """(uvicorn.Server, the app, the runner) for parsed arguments; the engine is loaded and
    warmed up, the runner not started yet."""
    from lserve_jax.engine.data_parallel import create_engine
    from lserve_jax.server.app import build_app
    from lserve_jax.server.metrics import ServerMetrics
    from lserve_jax.server.runner import EngineRunner

    engine = create_engine(args.ckpt, **engine_kwargs(args))
    if args.warmup:
        log.info("warmed up in %.1f s", warm_up(engine))
    name = args.served_model_name or default_model_name(args.ckpt)
    metrics = ServerMetrics(name)
    runner = EngineRunner(engine, max_pending=args.max_pending_requests, on_step=metrics.on_step)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        runner.start()
        log.info("ready: serving %s on http://%s:%d", name, args.host, args.port)
        yield
        runner.stop()
        log.info("stopped")

    app = build_app(runner, model_name=name, api_key=args.api_key, metrics=metrics,
                    max_body_bytes=args.max_body_bytes, lifespan=lifespan)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_timeout, lifespan="on")
    return _Server(config), app, runner


class _Server(uvicorn.Server):
    """uvicorn's server, except that SIGINT / SIGTERM end it with exit status 0 (uvicorn raises
    the signal again after its graceful shutdown, which would end the process with it)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("lserve_jax.server").setLevel(logging.INFO)
    if args.verbose:
        logging.getLogger("lserve_jax").setLevel(logging.INFO)
    try:
        hosts = start_devices(args)
        if hosts is not None and not multihost.is_leader():
            from lserve_jax.engine.engine import Engine

            multihost.follow(Engine(args.ckpt, **engine_kwargs(args)))  # no port here
            return 0
        server, _, runner = build_server(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        server.run()  # uvicorn handles SIGINT / SIGTERM: stop accepting, drain, shut down
    finally:
        runner.engine.release_followers()
    return 1 if runner.error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
