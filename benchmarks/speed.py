"""`make bench`: measured speed of every part, each figure the median of several runs, and each
comparison a ratio of runs taken side by side. Writes reports/bench.json and prints tables.

    python -m benchmarks.speed [--quick] [--model models/model.pt]
    python -m benchmarks.speed --tables reports/bench.json   # print a saved report's tables
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks.common import serve_process
from pipeline.charset import Charset
from pipeline.data.captcha_style import Renderer
from pipeline.data.shards import read_manifest, split_shards
from pipeline.data.stream import ShardStream, make_loader
from pipeline.device import pick_precision
from pipeline.files import write_json
from pipeline.model import ARCHS, build_model, checkpoint
from pipeline.model.preprocess import Preprocess
from pipeline.model.settings import ModelParams
from pipeline.model.settings import load_model_params as load_params
from pipeline.params import Params, Splits
from pipeline.stages.export import to_onnx
from pipeline.stages.generate import generate
from pipeline.stages.train import make_optimizer, train_step


def charset_of(params: Params) -> Charset:
    """The characters a model of these params reads."""
    return Charset(params.model_charset)


def median_of(runs: int, measure) -> float:
    return statistics.median(measure() for _ in range(runs))


# -- generation ------------------------------------------------------------------------------

def bench_generation(params: Params, runs: int, n: int) -> dict:
    from captcha.image import ImageCaptcha

    def bare():
        captcha = ImageCaptcha(width=128, height=64)
        t = time.perf_counter()
        for i in range(n):
            captcha.generate_image("AB12")
        return n / (time.perf_counter() - t)

    def stage(workers):
        def run():
            with tempfile.TemporaryDirectory() as tmp:
                data = dataclasses.replace(params.data, workers=workers, shard_size=n // 4,
                                           splits=Splits(train=n, val=0, test=0))
                t = time.perf_counter()
                generate(data, root=Path(tmp) / "shards", manifest=Path(tmp) / "m.parquet", progress=False)
                return n / (time.perf_counter() - t)
        return run

    rates = {"bare_loop": [], "stage_1_worker": [], "stage_2_workers": []}
    for _ in range(runs):  # interleaved, so drift in machine load hits all three alike
        rates["bare_loop"].append(bare())
        rates["stage_1_worker"].append(stage(1)())
        rates["stage_2_workers"].append(stage(2)())
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"images_per_second": med,
            "ratio_1_worker_vs_bare": med["stage_1_worker"] / med["bare_loop"],
            "ratio_2_vs_1_workers": med["stage_2_workers"] / med["stage_1_worker"]}


# -- training step and loader ----------------------------------------------------------------

def train_rate(params: Params, model_params: ModelParams, precision: str, batch: int, steps: int,
               channels_last: bool = True, device: str = "cpu") -> float:
    """Images/s of pipeline.stages.train's own training step (AdamW, grad clipping, grad scaler)
    on random data, with the train settings of `params` and the model of `model_params`."""
    torch.manual_seed(0)
    dev = torch.device(device)
    settings = model_params.settings
    charset, length = charset_of(params), params.data.max_length
    model = build_model(model_params.arch, settings, charset.num_classes, length).train().to(dev)
    x = torch.randn(batch, settings.channels, settings.height, settings.width)
    if channels_last:  # as pipeline.stages.train does
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, params.train)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    targets = torch.randint(1, charset.num_classes, (batch * length,))
    lengths = torch.full((batch,), length)

    def step():
        train_step(model, optimizer, scaler, x, targets, lengths, device=dev, precision=precision,
                   ctc=model_params.ctc, grad_clip=params.train.grad_clip)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(1 if dev.type == "cpu" else 5):  # warm-up (cuDNN picks its algorithms)
        step()
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def bench_cuda_training(params: Params, runs: int) -> dict:
    mixed = pick_precision("auto", torch.device("cuda"), "--cuda-only")  # bf16, or fp16 on GPUs without it
    cuda = {"mixed_precision": mixed}
    for arch in ARCHS:
        model_params = params.model.with_arch(arch)
        for precision in ("fp32", mixed):
            cuda[f"{arch}/{precision}"] = median_of(
                runs, lambda: train_rate(params, model_params, precision, 256, 20, device="cuda"))
            print(f"  cuda {arch}/{precision}: {cuda[f'{arch}/{precision}']:.0f} img/s", flush=True)
    return cuda


def loader_rate(shards: list[str], preprocess: Preprocess, charset: Charset, workers: int, images: int) -> float:
    stream = ShardStream(shards, lambda png, label, rng: (preprocess(png), charset.encode(label)), 128,
                         shuffle=True)
    loader = make_loader(stream, workers)
    it = iter(loader)
    next(it)  # workers started
    t, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch[0])
        if n >= images:
            break
    return n / (time.perf_counter() - t)


# -- inference -------------------------------------------------------------------------------

def inference(model_path: Path, runs: int) -> dict:
    from pipeline.files import file_sha256
    from pipeline.read.recognizer import Recognizer

    work = Path(tempfile.mkdtemp())  # a copy, so that models/ (a DVC output) is left alone
    model_path = Path(shutil.copy(model_path, work / "model.pt"))
    bundle = checkpoint.load(model_path)
    p = bundle.preprocess
    model_path.with_suffix(".onnx").write_bytes(to_onnx(bundle, file_sha256(model_path), opset=17))
    renderer = Renderer(128, 64)
    pngs = [renderer.png("AB12", i) for i in range(64)]
    batch = p.batch(pngs)
    results = {}
    for backend, threads in (("torch", 1), ("onnxruntime", 1), ("torch", 2), ("onnxruntime", 2)):
        rec = Recognizer(model_path, onnx=backend == "onnxruntime", threads=threads)
        one = batch[:1]
        for _ in range(20):
            rec.predict_arrays(one)

        def latency():
            t = time.perf_counter()
            for _ in range(200):
                rec.predict_arrays(one)
            return (time.perf_counter() - t) / 200 * 1e3

        def throughput():
            t = time.perf_counter()
            for _ in range(5):
                rec.predict_arrays(batch)
            return 5 * len(batch) / (time.perf_counter() - t)

        def end_to_end():  # PNG bytes -> text, preprocessing included
            t = time.perf_counter()
            for png in pngs:
                rec.predict([png])
            return (time.perf_counter() - t) / len(pngs) * 1e3

        results[f"{backend}_{threads}_threads"] = {
            "batch1_model_ms": median_of(runs, latency), "batch1_png_to_text_ms": median_of(runs, end_to_end),
            "batch64_images_per_second": median_of(runs, throughput)}
    torch.set_num_threads(os.cpu_count() or 1)
    return results


# -- HTTP service ----------------------------------------------------------------------------

def request_bodies(style: str, n: int = 32) -> list[bytes]:
    """What the HTTP clients send: captchas of the default style, or of a yardstick style."""
    if style == "captcha":
        renderer = Renderer(128, 64)
        return [renderer.png(f"{i:04d}", i) for i in range(n)]
    from benchmarks.yardstick import render_style

    return [png for _, png in render_style(style, "speed", n)]


def http_load(model_path: Path, seconds: float, clients: int, workers: int, bodies: list[bytes]) -> dict:
    import psutil

    with serve_process(model_path, "--workers", str(workers), "--threads", "16") as (url, server):
        def request(body):
            req = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": "image/png"})
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    r.read()
                    status = r.status
            except urllib.error.HTTPError as e:
                status = e.code
            return status, time.perf_counter() - t

        for body in bodies[:8]:
            request(body)
        proc = psutil.Process(server.pid)
        proc = proc.children()[0] if workers > 1 else proc  # a worker, not the supervisor
        rss_before = proc.memory_info().rss
        latencies, statuses, lock = [], [], threading.Lock()
        stop = time.perf_counter() + seconds

        def client(k):
            i = k
            while time.perf_counter() < stop:
                status, dt = request(bodies[i % len(bodies)])
                i += clients
                with lock:
                    latencies.append(dt)
                    statuses.append(status)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        rss_after = proc.memory_info().rss
    lat = np.array(latencies) * 1e3
    return {"clients": clients, "workers": workers, "seconds": round(elapsed, 1), "requests": len(lat),
            "requests_per_second": len(lat) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors_5xx": sum(s >= 500 for s in statuses),
            "non_200": sum(s != 200 for s in statuses),
            "rss_mb_before": rss_before / 2**20, "rss_mb_after": rss_after / 2**20}


def bench_http(model_path: Path, seconds: float, clients: int = 16, style: str = "captcha") -> dict:
    """16 clients against `serve` with one worker and with the default (one per core), in turn."""
    from pipeline.serving.supervisor import default_workers

    bodies = request_bodies(style)
    report = {}
    for workers in sorted({1, default_workers()}):
        print(f"HTTP, {model_path}, {workers} worker(s) ...", flush=True)
        report[f"{workers}_workers"] = {"model": str(model_path), "style": style,
                                        **http_load(model_path, seconds, clients, workers, bodies)}
        print(json.dumps(report[f"{workers}_workers"], indent=1), flush=True)
    return report


@click.command(help=__doc__)
@click.option("--quick", is_flag=True, help="fewer runs and shorter loads (smoke run)")
@click.option("--model", "models", multiple=True, default=["models/model.pt"], show_default=True,
              help="checkpoint for inference and HTTP; with --http-only, repeat it to load each in turn")
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              help="data, model and train settings")
@click.option("--style", default="captcha", show_default=True,
              help="the images the HTTP clients send: captcha (the default style) or a yardstick style")
@click.option("--out", default="reports/bench.json", show_default=True)
@click.option("--tables", metavar="REPORT", help="only print the tables of a saved report")
@click.option("--cuda-only", is_flag=True, help="only the CUDA training rates")
@click.option("--http-only", is_flag=True, help="only the HTTP load (needs --model)")
def main(quick, models, params_path, style, out, tables, cuda_only, http_only):
    if tables:
        print(format_tables(json.loads(Path(tables).read_text())))
        return
    runs = 1 if quick else 3
    params = load_params(params_path)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    if torch.cuda.is_available():
        report["machine"]["gpu"] = torch.cuda.get_device_name(0)
        print("CUDA training step per arch ...", flush=True)
        report["cuda_training_images_per_second"] = bench_cuda_training(params, runs)
    elif cuda_only:
        raise click.UsageError("--cuda-only: torch sees no CUDA device")
    if cuda_only:  # the GPU rows alone, for a GPU machine without the serving packages
        write_json(Path(out), report)
        print(format_tables(report))
        print(f"wrote {out}")
        return

    if http_only:  # each model in turn, in one run: side by side on one machine
        report["http"] = {f"{Path(m).stem} {k}": v for m in models
                          for k, v in bench_http(Path(m), 5 if quick else 30, style=style).items()}
        write_json(Path(out), report)
        print(format_tables(report))
        return

    print("generation ...", flush=True)
    report["generation"] = bench_generation(params, runs, 200 if quick else 2000)
    print(json.dumps(report["generation"], indent=1), flush=True)

    print("training step per arch and precision ...", flush=True)
    training = {}
    for arch in ARCHS:
        model_params = params.model.with_arch(arch)
        for precision in ("fp32", "bf16"):
            training[f"{arch}/{precision}"] = median_of(
                runs, lambda: train_rate(params, model_params, precision, 64, 3 if quick else 5))
            print(f"  {arch}/{precision}: {training[f'{arch}/{precision}']:.0f} img/s", flush=True)
    fast = params.model.with_arch("fast")
    training["fast/bf16/contiguous"] = median_of(
        runs, lambda: train_rate(params, fast, "bf16", 64, 5, channels_last=False))
    print(f"  fast/bf16 without channels-last: {training['fast/bf16/contiguous']:.0f} img/s", flush=True)
    report["training_images_per_second"] = training

    print("loader ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = dataclasses.replace(params.data, shard_size=500, splits=Splits(train=2000, val=0, test=0))
        generate(data, root=Path(tmp) / "shards", manifest=Path(tmp) / "m.parquet", progress=False)
        shards = [s for s, _ in split_shards(read_manifest(Path(tmp) / "m.parquet"), "train")]
        loading = {}
        by_input = {}  # architectures with the same input share one measurement
        for arch in ARCHS:
            pre = Preprocess.of(params.model.with_arch(arch).settings)
            for workers in (0, 1, 2):
                if (pre, workers) not in by_input:
                    by_input[pre, workers] = median_of(
                        runs, lambda: loader_rate(shards, pre, charset_of(params), workers, 1500))
                loading[f"{arch}/{workers}_workers"] = by_input[pre, workers]
                print(f"  {arch}, {workers} workers: {loading[f'{arch}/{workers}_workers']:.0f} img/s", flush=True)
    report["loader_images_per_second"] = loading

    model_path = Path(models[0])
    if not model_path.exists():
        print(f"{model_path} missing: inference figures use an untrained default model", flush=True)
        model_path = Path(tempfile.mkdtemp()) / "model.pt"
        fast = params.model.with_arch("fast")
        charset, length = charset_of(params), params.label_max_length
        model = build_model("fast", fast.settings, charset.num_classes, length)
        checkpoint.save(model_path, checkpoint.contents(model, "fast", fast.settings_dict(), charset.chars, length))
    print("inference ...", flush=True)
    report["inference"] = inference(model_path, runs)
    print(json.dumps(report["inference"], indent=1), flush=True)
    report["http"] = bench_http(model_path, 5 if quick else 30, style=style)
    write_json(Path(out), report)
    print(format_tables(report))
    print(f"wrote {out}")


def cuda_rates(cuda: dict, arch: str) -> list[str]:
    """An arch's CUDA img/s, fp32 then mixed precision, formatted."""
    return [f"{cuda[f'{arch}/{precision}']:,.0f}" for precision in ("fp32", cuda["mixed_precision"])]


def format_tables(report: dict) -> str:
    """The report as the markdown tables README carries."""
    m = report["machine"]
    out = [f"{report['date']}, {m['cpu']}, {m['cores']} cores, " + (f"{m['gpu']}, " if "gpu" in m else "")
           + f"torch {m['torch']}", ""]
    if "generation" not in report and "http" in report:  # an --http-only report
        return "\n".join(out + format_http(report["http"]))
    if "generation" not in report:  # a --cuda-only report
        cuda = report["cuda_training_images_per_second"]
        out += [f"| CUDA training step (batch 256) | fp32 img/s | {cuda['mixed_precision']} img/s |", "|---|---|---|"]
        out += [f"| `{arch}` | {' | '.join(cuda_rates(cuda, arch))} |" for arch in ARCHS]
        return "\n".join(out)
    gen = report["generation"]
    rates = gen["images_per_second"]
    out += ["| generation | img/s | ratio |", "|---|---|---|",
            f"| bare `ImageCaptcha.generate_image` loop | {rates['bare_loop']:.0f} | 1 |",
            f"| `generate`, 1 worker | {rates['stage_1_worker']:.0f} | {gen['ratio_1_worker_vs_bare']:.2f}x bare |",
            f"| `generate`, 2 workers | {rates['stage_2_workers']:.0f} | {gen['ratio_2_vs_1_workers']:.2f}x 1 worker |",
            ""]
    train_rates, load = report["training_images_per_second"], report["loader_images_per_second"]
    cuda = report.get("cuda_training_images_per_second", {})
    out += ["| training step (batch 64) | fp32 img/s | bf16 img/s | loader img/s, 0 / 1 / 2 workers "
            "| loader / bf16 step |" + (f" CUDA img/s, fp32 / {cuda['mixed_precision']} (batch 256) |"
                                          if cuda else ""),
            "|---|---|---|---|---|" + ("---|" if cuda else "")]
    for arch in ARCHS:
        fp32, bf16 = train_rates[f"{arch}/fp32"], train_rates[f"{arch}/bf16"]
        loaders = [load[f"{arch}/{w}_workers"] for w in (0, 1, 2)]
        row = (f"| `{arch}` | {fp32:.0f} | {bf16:.0f} | {' / '.join(f'{x:,.0f}' for x in loaders)} "
               f"| {min(loaders) / bf16:.0f}x |")
        if cuda:
            row += f" {' / '.join(cuda_rates(cuda, arch))} |"
        out.append(row)
    out += [f"(`fast` bf16 without channels-last: {train_rates['fast/bf16/contiguous']:.0f} img/s)", ""]
    out += ["| inference, `fast` | batch 1, model | batch 1, PNG bytes to text | batch 64 |", "|---|---|---|---|"]
    for name, r in report["inference"].items():
        backend, threads, _ = name.rsplit("_", 2)  # e.g. onnxruntime_2_threads
        out.append(f"| {backend}, {threads} thread{'s' if threads != '1' else ''} | {r['batch1_model_ms']:.1f} ms "
                   f"| {r['batch1_png_to_text_ms']:.1f} ms | {r['batch64_images_per_second']:,.0f} img/s |")
    out += [""] + format_http(report["http"])
    return "\n".join(out)


def format_http(http: dict) -> list[str]:
    out = []
    for h in http.values() if "clients" not in http else [http]:  # older reports hold one run
        model = f"{h['model']} ({h['style']}), " if "model" in h else ""
        out.append(f"HTTP, {model}{h['clients']} clients for {h['seconds']} s, `--workers {h.get('workers', 1)}`: "
                   f"{h['requests_per_second']:.0f} requests/s, p50 {h['p50_ms']:.0f} ms, p99 {h['p99_ms']:.0f} ms, "
                   f"{h['requests']:,} requests, {h['errors_5xx']} 5xx, RSS of one process "
                   f"{h['rss_mb_before']:.0f} -> {h['rss_mb_after']:.0f} MB")
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


if __name__ == "__main__":
    main()
