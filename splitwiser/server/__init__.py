"""``splitwiser serve``: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over a pipeline.

``app`` (routes, auth, errors), ``protocol`` (wire types), ``serving`` (completions and chat,
streamed or whole), ``bridge`` (the pipeline beside the event loop), ``chat`` (templates),
``metrics`` (Prometheus, vLLM's names), ``launcher`` (socket, start, graceful stop).
"""
