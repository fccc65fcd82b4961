"""A small student of a site model, measured: does it read as well as its teacher, and how fast?

Per style (the yardstick's, never trained on by anything else): 1,000 labelled captchas (seed
--seed) and the teacher fine-tuned on them from ddddocr's trunk (benchmarks/yardstick.py's
fine_tune with profiles/finetune.yaml, --teacher-minutes), or given (--teacher PATH). Then, for each
--unlabelled M and each --targets, the student route as a user runs it, in a folder of its own:
ingest of the labelled and M unlabelled captchas, the teach stage (the teacher reads the
unlabelled ones), and train with profiles/student.yaml for --minutes. `hard`: the teacher's
confident readings as labels; `soft`: those and its per-step probabilities (train.distill 1.0).
Teacher and student are scored on the same 500 test captchas, and each one's ONNX export is timed
(model only, 2 threads: batch 1, and batch 64 per image; 1 thread at batch 1). With --http, serve
answers 16 clients for 30 s with each model in turn (benchmarks/speed.py's load, captchas of the
style). Writes reports/bench/student.json.

    python -m benchmarks.student --styles claptcha,wheezy,serif --unlabelled 10000 --unlabelled 30000 \\
        --targets hard --targets soft --minutes 10 --http
"""
from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import click

from benchmarks.common import host_kind, in_folder, set_dotted
from benchmarks.yardstick import ALPHABETS, accuracy, fine_tune, read_with_model, render_style
from pipeline.files import file_sha256, write_json
from pipeline.model import checkpoint
from pipeline.params import dump_yaml, read_yaml


def student_route(teacher: Path, labelled: list[tuple[str, bytes]], unlabelled: list[bytes], minutes: float,
                  targets: str, workdir: Path, repo: Path, overrides: dict) -> tuple[Path, dict]:
    """ingest + teach + train with profiles/student.yaml in `workdir`; (the student, its reports)."""
    from pipeline.model.settings import load_model_params
    from pipeline.stages.ingest import ingest
    from pipeline.stages.teach import teach
    from pipeline.stages.train import train
    from pipeline.tools.profile import apply_profile

    site = workdir / "site"
    site.mkdir(parents=True)
    for i, (label, png) in enumerate(labelled):
        (site / f"{label}_{i}.png").write_bytes(png)
    for i, png in enumerate(unlabelled):  # names the label pattern does not match: no label
        (site / f"_unlabelled_{i}.png").write_bytes(png)
    (workdir / "pretrained").mkdir()
    shutil.copy(teacher, workdir / "pretrained/teacher.pt")
    shutil.copy(repo / "params.yaml", workdir / "params.yaml")
    apply_profile("student", workdir / "params.yaml")
    params = read_yaml(workdir / "params.yaml")
    # the benchmark scores on test captchas of its own: the profile's test tenth goes to training
    params["ingest"].update(source=str(site), fractions={"train": 0.9, "val": 0.1, "test": 0.0})
    params["train"]["max_minutes"] = minutes
    params["teach"]["soft"] = targets == "soft"
    params["train"]["distill"] = 1.0 if targets == "soft" else 0.0
    for key, value in overrides.items():
        set_dotted(params, key, value)
    (workdir / "params.yaml").write_text(dump_yaml(params))
    with in_folder(workdir):
        loaded = load_model_params(Path("params.yaml"))
        ingest(loaded.data, loaded.ingest, skip_invalid=True)
        taught = teach(loaded, progress=False)
        summary = train(loaded, progress=False)
    return workdir / "models/model.pt", {"teach": taught, "train": {
        k: summary[k] for k in ("best_val_seq_accuracy", "epochs_run", "images_seen", "train_seconds",
                                "images_per_second", "parameters", "distill")}}


def onnx_ms(model: Path, images: list[bytes]) -> dict:
    """ONNX runtime's time per image, the model alone (inputs preprocessed beforehand)."""
    from pipeline.read.recognizer import Recognizer
    from pipeline.stages.export import to_onnx

    work = Path(tempfile.mkdtemp())
    copy = Path(shutil.copy(model, work / "model.pt"))
    bundle = checkpoint.load(copy)
    copy.with_suffix(".onnx").write_bytes(to_onnx(bundle, file_sha256(copy), opset=17))
    batch = bundle.preprocess.batch(images[:64])
    result = {}
    for threads in (1, 2):
        recognizer = Recognizer(copy, onnx=True, threads=threads)
        for _ in range(10):
            recognizer.probs(batch[:1])

        def per_image(size: int, repeats: int) -> float:
            started = time.perf_counter()
            for _ in range(repeats):
                recognizer.probs(batch[:size])
            return (time.perf_counter() - started) / (repeats * size) * 1e3

        result[f"batch1_ms_{threads}_threads"] = statistics.median(per_image(1, 100) for _ in range(3))
        if threads == 2:
            result["batch64_ms_per_image_2_threads"] = statistics.median(per_image(64, 5) for _ in range(3))
    shutil.rmtree(work)
    return {k: round(v, 3) for k, v in result.items()}


@click.command(help=__doc__)
@click.option("--styles", default="claptcha,wheezy,serif", show_default=True)
@click.option("--labels", "n_labels", default=1000, show_default=True)
@click.option("--unlabelled", "unlabelled_counts", multiple=True, type=int, help="unlabelled captchas (repeatable)")
@click.option("--targets", "target_kinds", multiple=True, type=click.Choice(["hard", "soft"]), help="(repeatable)")
@click.option("--minutes", default=10.0, show_default=True, help="the student's training budget")
@click.option("--teacher", "teacher_path", type=click.Path(path_type=Path), default=None,
              help="a teacher checkpoint (one style only); default: fine-tune one")
@click.option("--teacher-minutes", default=10.0, show_default=True)
@click.option("--teacher-set", multiple=True, metavar="KEY=VALUE", help="params of the teacher's fine-tune")
@click.option("--student-set", multiple=True, metavar="KEY=VALUE", help="params of the student's training")
@click.option("--seed", default=0, show_default=True)
@click.option("--http", is_flag=True, help="serve each model in turn under 16 clients for 30 s")
@click.option("--cache", type=click.Path(path_type=Path), default=None, help="keeps rendered captchas between runs")
@click.option("--keep", type=click.Path(path_type=Path), default=None, help="keep every teacher and student here")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/bench/student.json"), show_default=True)
def main(styles, n_labels, unlabelled_counts, target_kinds, minutes, teacher_path, teacher_minutes, teacher_set,
         student_set, seed, http, cache, keep, out):
    from benchmarks.common import parse_override
    from benchmarks.speed import bench_http

    repo = Path(__file__).resolve().parents[1]
    teacher_overrides = {"train.seed": seed} | dict(parse_override(s) for s in teacher_set)
    student_overrides = {"train.seed": seed} | dict(parse_override(s) for s in student_set)
    report = {"date": time.strftime("%Y-%m-%d"), "host": host_kind(), "labels": n_labels, "minutes": minutes,
              "seed": seed, "teacher_settings": teacher_overrides, "student_settings": student_overrides, "styles": {}}
    for style in styles.split(","):
        started = time.perf_counter()
        test = render_style(style, "test", 500, cache=cache)
        test_labels, test_images = [t for t, _ in test], [p for _, p in test]
        labelled = render_style(style, "train", n_labels, seed, cache)
        row = report["styles"][style] = {"students": []}
        work = Path(tempfile.mkdtemp(prefix=f"student-{style}-"))
        if teacher_path:
            teacher = teacher_path
        else:
            teacher = fine_tune(None, None, labelled, teacher_minutes, work / "teacher", repo, trunk=True,
                                overrides=teacher_overrides)
        row["teacher_minutes"] = round((time.perf_counter() - started) / 60, 1)
        readings, _ = read_with_model(teacher, test_images, ALPHABETS[style])
        row["teacher"] = {"test_accuracy": accuracy(test_labels, readings), **onnx_ms(teacher, test_images)}
        print(style, "teacher", json.dumps(row["teacher"]), flush=True)
        models = {"teacher": teacher}
        for count in unlabelled_counts:
            unlabelled = [png for _, png in render_style(style, "unlabelled", count, seed, cache)]
            for targets in target_kinds:
                t = time.perf_counter()
                name = f"student {targets} +{count}"
                student, reports = student_route(teacher, labelled, unlabelled, minutes, targets,
                                                 work / name.replace(" ", "-"), repo, student_overrides)
                route_minutes = (time.perf_counter() - t) / 60
                readings, _ = read_with_model(student, test_images, ALPHABETS[style])
                result = {"name": name, "unlabelled": count, "targets": targets,
                          "test_accuracy": accuracy(test_labels, readings), "route_minutes": round(route_minutes, 1),
                          **onnx_ms(student, test_images), **reports}
                row["students"].append(result)
                models[name] = student
                print(style, name, json.dumps({k: v for k, v in result.items() if k not in ("teach", "train")}),
                      flush=True)
                write_json(out, report)
        if http:
            best = max(row["students"], key=lambda r: r["test_accuracy"])["name"]
            row["http"] = {name: bench_http(models[name], 30, style=style) for name in ("teacher", best)}
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
            for name, path in models.items():
                shutil.copy(path, keep / f"{style}-{name.replace(' ', '-')}.pt")
        shutil.rmtree(work, ignore_errors=True)
        write_json(out, report)
    print(format_table(report))


def format_table(report: dict) -> str:
    lines = ["| style | model | test accuracy | ONNX ms/img, batch 1 (2 threads) | batch 64 |", "|---|---|---|---|---|"]
    for style, row in report["styles"].items():
        for name, r in [("teacher", row["teacher"])] + [(s["name"], s) for s in row["students"]]:
            lines.append(f"| {style} | {name} | {r['test_accuracy']:.1%} | {r['batch1_ms_2_threads']:.2f} "
                         f"| {r['batch64_ms_per_image_2_threads']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
