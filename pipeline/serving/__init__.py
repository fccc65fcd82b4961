"""Serving the model over HTTP: the Flask app and its per-request limits (app), waitress hardened
against clients that misbehave (http), the process supervisor that keeps --workers serving one
socket (supervisor), the model swapped in on SIGHUP (live_model), and the kept captchas with the
site's verdicts on them (feedback). pipeline/tools/serve.py puts them together."""
