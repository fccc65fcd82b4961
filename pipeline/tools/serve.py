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
from pipeline.files import file_sha256
from pipeline.read.recognizer import Recognizer
from pipeline.serving.app import Limits, check_feedback_token, create_app
from pipeline.serving.feedback import Keeper, KeepLimits
from pipeline.serving.http import listen, make_server
from pipeline.serving.live_model import LiveModel
from pipeline.serving.supervisor import default_workers, supervise

log = logging.getLogger("captcha-crnn.serve")
TOKEN_ENV = "CAPTCHA_CRNN_FEEDBACK_TOKEN"


def serve_worker(sock: socket.socket, model: Path, threads: int, onnx: bool | None, limits: Limits,
                 metrics_path: Path | None, torch_threads: int, health=None, keeper: Keeper | None = None,
                 feedback_token: str | None = None) -> None:
    def load() -> Recognizer:
        return Recognizer(model, onnx=onnx, threads=torch_threads)

    live = LiveModel(load(), load)
    live.reload_on(signal.SIGHUP)
    if file_sha256(model) != live.current.model_sha256:  # replaced while this worker started: a SIGHUP came
        live.request_reload()                             # then, or will; until its handler, SIGHUP was ignored
    app = create_app(live, limits, metrics_path, health=health, keeper=keeper, feedback_token=feedback_token)
    log.info("serving %s (%s) on http://%s:%d", model, live.current.backend, *sock.getsockname()[:2])
    make_server(app, sock, threads, limits).run()


def check_model(model: Path, onnx: bool | None) -> None:
    """Load the model and read one image, in a child process: a model that cannot read stops serve
    here, in one line, before any worker starts (and this process starts no thread pool that its
    forked workers would inherit half-made)."""
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)

    def load():
        try:
            Recognizer(model, onnx=onnx)
            writer.send(None)
        except PipelineError as e:
            writer.send(str(e))

    child = context.Process(target=load, daemon=True)
    child.start()
    child.join()
    problem = reader.recv() if reader.poll() else f"{model}: loading the model failed (exit {child.exitcode})"
    if problem:
        raise PipelineError(problem)


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
    check_feedback_token(feedback_token)
    check_model(model, onnx)
    keeper = None
    if keep is not None:
        keeper = Keeper(keep, keep_limits)  # its counts live in keep/.budget, shared by the workers
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
@click.option("--feedback-token", envvar=TOKEN_ENV, default=None,
              help="take POST /feedback only with the header 'Authorization: Bearer TOKEN' "
                   "[env: CAPTCHA_CRNN_FEEDBACK_TOKEN]")
def cli(model_path, onnx, host, port, workers, threads, keep, keep_max_captchas, keep_max_mb, feedback_token):
    """Serve POST /predict, GET /healthz and GET /model over HTTP (waitress); `kill -HUP` reloads
    the model file (a file that fails to load leaves the old model serving)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the workers' reload handlers (python -m pipeline.tools.serve)
    if feedback_token is None and os.environ.get(TOKEN_ENV) == "":  # click reads a set but empty variable as unset
        feedback_token = ""  # refused below: an empty token must not mean "no token"
    serve(model_path, host, port, workers=workers, threads=threads, onnx=onnx, keep=keep,
          keep_limits=KeepLimits(keep_max_captchas, keep_max_mb * 2**20), feedback_token=feedback_token)


if __name__ == "__main__":  # python -m pipeline.tools.NAME
    run(__spec__.name)
