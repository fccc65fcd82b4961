"""Serving the model over HTTP, in three parts: the Flask app and its per-request limits (app),
waitress hardened against clients that misbehave (http), and the process supervisor that keeps
--workers serving one socket (supervisor). pipeline/tools/serve.py puts them together."""
