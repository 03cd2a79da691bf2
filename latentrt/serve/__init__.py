"""``latentrt serve``: an HTTP image server over the runtime (the ``serve`` extra: fastapi, uvicorn,
prometheus-client, python-multipart).

* :mod:`.worker` - one batching worker per loaded pipeline (queue, batches, cancellation); no HTTP;
* :mod:`.api_openai`, :mod:`.api_a1111` - the two APIs as pure functions (request -> job, result /
  error -> answer);
* :mod:`.app` - :func:`~.app.create_app`, the FastAPI routes over a :class:`~.app.Server` of workers;
* :mod:`.metrics` - Prometheus metrics; :mod:`.preview` - cheap latent previews.

It imports the runtime, never :mod:`latentrt.export`.
"""
