"""The OpenAI-compatible HTTP server over the engine (`python -m lserve_jax.serve`).

`runner.EngineRunner` is the one thread that owns the engine; `app.build_app` the FastAPI app
whose handlers only enqueue and await; `protocol` the request bodies and their translation to
`SamplingParams`; `metrics` the Prometheus metrics.
"""
