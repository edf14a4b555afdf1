"""``rs-local serve``: an OpenAI-compatible server where each request chooses its steering.

Needs the ``serve`` extra (FastAPI, uvicorn, sse-starlette). Modules: :mod:`.steering`
(named vectors and per-request steering), :mod:`.requests` (checked request bodies),
:mod:`.scheduler` (the one worker that owns the llama.cpp context), :mod:`.responses`
(OpenAI shapes) and :mod:`.app` (routes, errors, uvicorn). Importing this package imports
none of the web stack, so the CLI can say what to install when it is missing.
"""
