"""`serve`: the model over HTTP (pipeline/serving/: the app and its limits, the hardened waitress
server, the supervisor of --workers, the model reloaded on SIGHUP, --keep and the site's feedback)."""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from pathlib import Path

import click

from pipeline import outputs
from pipeline.cli import command, model_option, onnx_option, run
from pipeline.errors import PipelineError
from pipeline.read.recognizer import Recognizer
from pipeline.serving.app import Limits, create_app
from pipeline.serving.feedback import Budget, Keeper, KeepLimits
from pipeline.serving.http import listen, make_server
from pipeline.serving.live_model import LiveModel
from pipeline.serving.supervisor import default_workers, supervise

log = logging.getLogger("captcha-crnn.serve")


def serve_worker(sock: socket.socket, model: Path, threads: int, onnx: bool | None, limits: Limits,
                 metrics_path: Path | None, torch_threads: int, health=None, keeper: Keeper | None = None,
                 feedback_token: str | None = None) -> None:
    def load() -> Recognizer:
        return Recognizer(model, onnx=onnx, threads=torch_threads)

    live = LiveModel(load(), load)
    live.reload_on(signal.SIGHUP)
    app = create_app(live, limits, metrics_path, health=health, keeper=keeper, feedback_token=feedback_token)
    log.info("serving %s (%s) on http://%s:%d", model, live.current.backend, *sock.getsockname()[:2])
    make_server(app, sock, threads, limits).run()


def serve(model: Path, host: str, port: int, workers: int | None = None, threads: int = 16,
          onnx: bool | None = None, limits: Limits = Limits(),
          metrics_path: Path | None = outputs.METRICS, keep: Path | None = None,
          keep_limits: KeepLimits = KeepLimits(), feedback_token: str | None = None) -> None:
    """Listen on host:port; one process serves, or a supervisor keeps `workers` processes serving
    the one listening socket (each loads its own model after the fork). SIGHUP reloads the model
    file in every process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(message)s")
    workers = workers or default_workers()
    if not Path(model).is_file():
        raise PipelineError(f"{model}: checkpoint not found")
    if feedback_token is not None and len(feedback_token) < 16:
        raise PipelineError("--feedback-token: at least 16 characters (it guards what training learns)")
    keeper = None
    if keep is not None:
        keeper = Keeper(keep, Budget(keep_limits))  # its counts live in memory the workers share
        keeper.recount()
    sock = listen(host, port)
    torch_threads = max(1, (os.cpu_count() or 1) // workers)

    down = multiprocessing.get_context("fork").RawValue("i", 0)  # workers missing, shared with every worker

    def start_worker():
        health = (lambda: {"workers": workers, "workers_down": down.value}) if workers > 1 else None
        serve_worker(sock, model, threads, onnx, limits, metrics_path, torch_threads, health, keeper, feedback_token)

    if workers == 1:
        start_worker()
    else:
        supervise(workers, start_worker, down=down)


@command("serve")
@model_option
@onnx_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=None, type=click.IntRange(1),
              help="processes, kept up by a supervisor [default: one per core, at most 8]")
@click.option("--threads", default=16, show_default=True, type=click.IntRange(1), help="threads per process")
@click.option("--keep", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="keep every answered captcha here with its reading and an id, for POST /feedback")
@click.option("--keep-max-captchas", default=KeepLimits.max_captchas, show_default=True, type=click.IntRange(1),
              help="captchas --keep holds at most; the oldest are dropped")
@click.option("--keep-max-mb", default=KeepLimits.max_bytes // 2**20, show_default=True, type=click.IntRange(1),
              help="MiB --keep holds at most; the oldest are dropped")
@click.option("--feedback-token", envvar="CAPTCHA_CRNN_FEEDBACK_TOKEN", default=None,
              help="take POST /feedback only with the header 'Authorization: Bearer TOKEN' "
                   "[env: CAPTCHA_CRNN_FEEDBACK_TOKEN]")
def cli(model_path, onnx, host, port, workers, threads, keep, keep_max_captchas, keep_max_mb, feedback_token):
    """Serve POST /predict, GET /healthz and GET /model over HTTP (waitress); `kill -HUP` reloads
    the model file (a file that fails to load leaves the old model serving)."""
    serve(model_path, host, port, workers=workers, threads=threads, onnx=onnx, keep=keep,
          keep_limits=KeepLimits(keep_max_captchas, keep_max_mb * 2**20), feedback_token=feedback_token)


if __name__ == "__main__":  # python -m pipeline.tools.NAME
    run(__spec__.name)
