"""`sgdiff serve`: an OpenAI-compatible HTTP server over one engine (FastAPI + uvicorn), with video
jobs kept on disk, a bounded queue, Bearer auth and Prometheus metrics."""
