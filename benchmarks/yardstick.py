"""The yardstick: captcha styles that no model of this project trains on, as evaluation data only.

Five styles, each from another generator or font than the synthetic data uses: `claptcha`,
`wheezy.captcha` and `multicolorcaptcha` (PyPI packages), the `captcha` package with serif fonts
and lower-case labels (`serif`), and a plain digits style (`digits`). Their fonts are
pipeline.data.mixed_style.YARDSTICK_FONTS and multicolorcaptcha's own: the `mixed` style never draws them.

Per style it reports full-sequence accuracy, letters compared case-insensitively (most sites
accept either case; `ddddocr` answers in lower case), both readers told the style's alphabet
(digits, or letters and digits) as a user would tell them (--allowed, ddddocr's set_ranges), and
the number of labels with a doubled character read with one of the pair dropped: each --model
zero-shot (a checkpoint, or `ddddocr`: ddddocr's network cut to 0-9A-Z, nothing trained),
`ddddocr` itself (--ddddocr), and, with --finetune N, the first model fine-tuned on N labelled
images of the style (rendered from their own seeds, never the test images') for --minutes, through
the real ingest and train stages with the shipped profiles/finetune.yaml. --unlabelled M adds a
run with M unlabelled captchas of the style too (self-training, --pseudo-rounds); --scratch one
from scratch. --variant runs fine-tunes with params of their own side by side, each on the captchas
of every --seeds (a seed draws the labelled captchas and train.seed; the test captchas stay the
same); --epochs bounds them by epochs instead of minutes, so that what else runs on the machine
does not change the result.

\b
    python -m benchmarks.yardstick --model ddddocr --ddddocr --finetune 1000 --minutes 10 [--unlabelled 10000]
    python -m benchmarks.yardstick --model ddddocr --styles claptcha,wheezy --finetune 1000 --epochs 20 \\
        --seeds 0,1 --variant base --variant 'trunk train.trunk_lr=0.3' --cache ~/.cache/yardstick

Needs the ddddocr extra (make install installs it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import random
import shutil
import string
import tempfile
import time
from pathlib import Path
from typing import Callable

import click
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from benchmarks.common import host_kind, in_folder, parse_override, parse_variant, set_dotted
from pipeline.data.captcha_style import Renderer
from pipeline.data.mixed_style import YARDSTICK_FONT
from pipeline.data.seeds import derive_seed
from pipeline.data.shards import Sample, iter_tar, write_shard
from pipeline.files import write_json
from pipeline.model import checkpoint
from pipeline.model.settings import load_model_params as load_params
from pipeline.params import dump_yaml, read_yaml
from pipeline.read.metrics import compute_metrics
from pipeline.read.recognizer import Recognizer

TRUNK = "ddddocr"  # --model ddddocr: ddddocr's network cut to the charset, fine-tuned as profiles/finetune.yaml ships
ALNUM = string.digits + string.ascii_uppercase + string.ascii_lowercase


def random_label(rng: random.Random, chars: str, lengths: tuple[int, int]) -> str:
    return "".join(rng.choice(chars) for _ in range(rng.randint(*lengths)))


@contextlib.contextmanager
def seeded_global_random(seed: int):
    """The generators below draw from the `random` module itself: seed it for one image."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def claptcha_style(label_rng, seed):
    from claptcha import Claptcha

    if not hasattr(ImageFont.FreeTypeFont, "getsize"):  # claptcha 0.3.3 predates Pillow 10
        ImageFont.FreeTypeFont.getsize = lambda self, text: self.getbbox(text)[2:]
    label = random_label(label_rng, ALNUM, (4, 6))
    with seeded_global_random(seed):
        _, image = Claptcha(label, YARDSTICK_FONT["liberation-serif"], size=(200, 80), noise=0.3).image
    return label, image


def wheezy_style(label_rng, seed):
    from wheezy.captcha import image as wz

    label = random_label(label_rng, ALNUM, (4, 5))
    draw = wz.captcha(drawings=[
        wz.background(), wz.text(fonts=[YARDSTICK_FONT["liberation-sans-bold"]],
                                 drawings=[wz.warp(), wz.rotate(), wz.offset()]),
        wz.curve(), wz.noise(), wz.smooth()], width=200, height=75)
    with seeded_global_random(seed):
        return label, draw(list(label))


def multicolor_style(label_rng, seed):
    from multicolorcaptcha import CaptchaGenerator

    # the library picks the text itself, from the same stream as its drawing
    with seeded_global_random(seed):
        captcha = CaptchaGenerator(2).gen_captcha_image(difficult_level=label_rng.randint(1, 3), chars_mode="ascii")
    return captcha.characters, captcha.image


def serif_style(label_rng, seed):
    label = random_label(label_rng, string.digits + string.ascii_lowercase, (5, 6))
    renderer = Renderer(180, 60, [YARDSTICK_FONT["dejavu-serif"], YARDSTICK_FONT["dejavu-serif-bold"]], [40, 46])
    return label, renderer.image(label, seed)


def digits_style(label_rng, seed):
    label = random_label(label_rng, string.digits, (4, 6))
    rng = random.Random(seed)
    font = ImageFont.truetype(YARDSTICK_FONT["liberation-sans"], rng.randint(24, 30))
    image = Image.new("RGB", (120, 40), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x = rng.randint(4, 14)
    for c in label:
        draw.text((x, rng.randint(2, 8)), c, font=font, fill=(rng.randint(0, 90),) * 3)
        x += font.getbbox(c)[2] + rng.randint(0, 4)
    for _ in range(rng.randint(1, 3)):
        draw.line([(0, rng.randint(0, 40)), (120, rng.randint(0, 40))], fill=(150, 150, 150), width=1)
    return label, image.filter(ImageFilter.GaussianBlur(0.5))


STYLES: dict[str, Callable] = {"claptcha": claptcha_style, "wheezy": wheezy_style,
                               "multicolor": multicolor_style, "serif": serif_style, "digits": digits_style}
# What a user knows of their site and tells either reader (--allowed, ddddocr's set_ranges).
ALPHABETS = {name: ALNUM for name in STYLES} | {"digits": string.digits}


def crop_letterbox_of(png: bytes) -> bytes:
    """The image cut to the box of pixels unlike its top-left one (multicolor's black letterbox
    away), as a user could do to their site's captchas before labelling them."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    box = ImageChops.difference(image, Image.new("RGB", image.size, image.getpixel((0, 0)))).getbbox()
    if box is None:
        return png
    out = io.BytesIO()
    image.crop(box).save(out, "PNG")
    return out.getvalue()


def render_one(name: str, split: str, i: int, seed: int = 0) -> tuple[str, bytes]:
    """Image i of a style's split: its label and its rendering from independent seeds where the
    generator lets them be."""
    label_rng = random.Random(derive_seed(seed, "yardstick", name, split, i, "label"))
    label, image = STYLES[name](label_rng, derive_seed(seed, "yardstick", name, split, i, "render"))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")  # as a site would serve it, transparency included
    return label, buffer.getvalue()


def render_style(name: str, split: str, n: int, seed: int = 0, cache: Path | None = None) -> list[tuple[str, bytes]]:
    """n (label, PNG bytes) of a style; a thousand or more on every core (each image is a pure
    function of its seeds, so the same whatever the processes). With `cache`, a folder, the set
    is kept there as a tar and read back next time (claptcha draws 2-3 images a second a core)."""
    if n == 0:
        return []
    stored = cache / f"{name}-{split}-{seed}-{n}.tar" if cache else None
    if stored and stored.is_file():
        return read_rendered(stored)
    jobs = [(name, split, i, seed) for i in range(n)]
    if n < 1000 or (os.cpu_count() or 1) == 1:
        rendered = [render_one(*job) for job in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
            rendered = pool.starmap(render_one, jobs, chunksize=64)
    if stored:
        write_rendered(rendered, stored)
    return rendered


def write_rendered(rendered: list[tuple[str, bytes]], path: Path) -> None:
    """(label, PNG) pairs as a shard (keys in order), written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_shard(path, (Sample(f"{i:07d}", png, label, {}) for i, (label, png) in enumerate(rendered)))


def read_rendered(path: Path) -> list[tuple[str, bytes]]:
    return [(sample["txt"].decode("utf-8"), sample["png"]) for sample in iter_tar(path)]


def accuracy(labels: list[str], readings: list[str]) -> float:
    return sum(a.upper() == b.upper() for a, b in zip(labels, readings)) / len(labels)


def doubled_read_once(labels: list[str], readings: list[str]) -> str:
    """'k of n': of the n labels with a doubled character (case-insensitive), how many were read
    as the label with one of the pair dropped (a CTC model that emits no blank between them)."""
    pairs = [(a.upper(), b.upper()) for a, b in zip(labels, readings)]
    doubled = [(a, b) for a, b in pairs if any(x == y for x, y in zip(a, a[1:]))]
    once = sum(any(a[i] == a[i + 1] and a[:i] + a[i + 1:] == b for i in range(len(a) - 1)) for a, b in doubled)
    return f"{once} of {len(doubled)}"


def read_with_model(model: Path, images: list[bytes], alphabet: str = ALNUM) -> tuple[list[str], float]:
    recognizer = Recognizer(model, onnx=False)
    allowed = "".join(c for c in recognizer.charset.chars if c.upper() in alphabet.upper())
    started = time.perf_counter()
    readings = [p.text for p in recognizer.predict(images, allowed=allowed, case="upper")]
    return readings, (time.perf_counter() - started) / len(images) * 1e3


def read_with_ddddocr(images: list[bytes], alphabet: str = ALNUM) -> tuple[list[str], float]:
    import ddddocr

    with contextlib.redirect_stdout(io.StringIO()):
        ocr = ddddocr.DdddOcr(show_ad=False)
    ocr.set_ranges(alphabet)
    started = time.perf_counter()
    readings = [ocr.classification(image, png_fix=True) for image in images]  # transparency onto white
    return readings, (time.perf_counter() - started) / len(images) * 1e3


def packaged_trunk(out: Path, repo: Path) -> Path:
    """ddddocr's reader, its output layer cut to the fine-tune charset and nothing trained: the
    ddddocr trunk zero-shot, as a checkpoint."""
    from pipeline.model import build_model
    from pipeline.model.transfer import from_packaged_trunk

    params = load_params(repo / "params.yaml")
    settings = params.model.with_arch("ddddocr").settings
    charset = params.data.charset
    model = build_model("ddddocr", settings, len(charset) + 1, 8)
    from_packaged_trunk(model, charset)
    checkpoint.save(out, checkpoint.contents(model, "ddddocr", dataclasses.asdict(settings), charset, 8))
    return out


def fine_tune(model: Path | None, pretrained_like: Path | None, train: list[tuple[str, bytes]], minutes: float,
              workdir: Path, repo: Path, trunk: bool = False, unlabelled: list[bytes] = (),
              pseudo_rounds: int = 0, overrides: dict | None = None,
              labels_csv: Path | None = None) -> Path:
    """Ingest `train` and train on it alone for `minutes` with the shipped fine-tune profile
    (profiles/finetune.yaml) in `workdir`: with `trunk`, from the packaged ddddocr trunk as the
    profile ships; else from `model`, or from scratch with the architecture of `pretrained_like`.
    With `labels_csv`, ingest reads its folder with it instead of `train`. `overrides` maps dotted
    params keys to values, set last. Returns the new checkpoint; the run's reports stay in
    `workdir`/reports (see `run_report`)."""
    from pipeline.stages.ingest import ingest
    from pipeline.stages.train import train as run_train
    from pipeline.tools.profile import apply_profile

    folder = labels_csv.parent if labels_csv else workdir / "labelled"
    workdir.mkdir(parents=True, exist_ok=True)
    if not labels_csv:
        folder.mkdir(parents=True)
    for i, (label, png) in enumerate(train):
        (folder / f"{label}_{i}.png").write_bytes(png)
    for i, png in enumerate(unlabelled):  # names the label pattern does not match: no label
        (folder / f"_unlabelled_{i}.png").write_bytes(png)
    shutil.copy(repo / "params.yaml", workdir / "params.yaml")
    apply_profile("finetune", workdir / "params.yaml")
    params = read_yaml(workdir / "params.yaml")
    params["ingest"]["max_length"] = 8
    if not trunk:
        ckpt = checkpoint.read(pretrained_like)
        params["data"]["charset"] = ckpt["charset"]
        params["ingest"]["max_length"] = max(8, ckpt["max_length"])
        params["model"]["arch"] = ckpt["arch"]
        params["model"][ckpt["arch"]] = ckpt["settings"]
        params["train"]["init_from"] = ""
    # the yardstick scores on test captchas of its own: the profile's test tenth goes to training
    params["ingest"].update(source=str(folder), labels=str(labels_csv or ""),
                            fractions={"train": 0.9, "val": 0.1, "test": 0.0})
    params["train"].update(max_minutes=minutes, pseudo_rounds=pseudo_rounds if unlabelled else 0)
    params["ingest"]["unlabelled"] = bool(unlabelled)
    for key, value in (overrides or {}).items():
        set_dotted(params, key, value)
    if model is not None and not trunk:
        (workdir / "pretrained").mkdir()
        shutil.copy(model, workdir / "pretrained/model.pt")
        params["train"]["init_from"] = "pretrained/model.pt"
    (workdir / "params.yaml").write_text(dump_yaml(params))
    with in_folder(workdir):
        loaded = load_params(Path("params.yaml"))
        ingest(loaded.data, loaded.ingest, skip_invalid=True)
        run_train(loaded, progress=False)
    return workdir / "models/model.pt"


def run_report(workdir: Path) -> dict:
    """What a fine-tune in `workdir` left: its training summary and its per-epoch history."""
    from pipeline import outputs

    summary = json.loads((workdir / outputs.TRAIN_SUMMARY).read_text())
    header, *rows = (workdir / outputs.HISTORY).read_text().splitlines()
    names = header.split("\t")
    history = [{k: float(v) for k, v in zip(names, row.split("\t"))} for row in rows]
    return {key: summary[key] for key in ("best_val_seq_accuracy", "best_epoch", "epochs_run", "images_seen",
                                          "train_seconds", "images_per_second", "pseudo_rounds")} | {
        "history": history}


@click.command(help=__doc__)
@click.option("--model", "models_given", multiple=True,
              help=f"checkpoint(s) to score zero-shot, or {TRUNK!r}: the packaged trunk; the first is fine-tuned")
@click.option("--n", default=500, show_default=True, help="test images per style")
@click.option("--styles", default=",".join(STYLES), show_default=True)
@click.option("--ddddocr", "with_ddddocr", is_flag=True, help="score ddddocr too")
@click.option("--finetune", multiple=True, type=int, help="labelled images to fine-tune on (repeatable)")
@click.option("--minutes", default=5.0, show_default=True, help="training minutes per fine-tune")
@click.option("--epochs", type=int, default=0,
              help="train this many epochs instead, unbounded by time (comparable whatever else runs)")
@click.option("--seeds", default="0", show_default=True,
              help="comma-separated: each draws its own labelled (and unlabelled) captchas and train.seed")
@click.option("--variant", "variants", multiple=True, metavar="'NAME KEY=VALUE ...'",
              help="a fine-tune with these params (dotted keys) or unlabelled=M; default: one, 'fine-tuned'")
@click.option("--scratch", is_flag=True, help="also train from scratch on the same images")
@click.option("--unlabelled", default=0, show_default=True,
              help="also fine-tune with this many unlabelled captchas of the style (self-training)")
@click.option("--pseudo-rounds", default=2, show_default=True, help="self-training rounds with --unlabelled")
@click.option("--no-plain", is_flag=True, help="with --unlabelled: skip the fine-tune without them")
@click.option("--crop-letterbox", is_flag=True,
              help="cut every image to the box unlike its corner first (multicolor's letterbox)")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="a params value for every fine-tune, e.g. model.ddddocr.width=256")
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="a folder keeping rendered captchas between runs")
@click.option("--keep", type=click.Path(path_type=Path), default=None,
              help="a folder keeping each fine-tuned checkpoint (STYLE-VARIANT-LABELS-sSEED.pt)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/yardstick.json"), show_default=True)
def main(models_given, n, styles, with_ddddocr, finetune, minutes, epochs, seeds, variants, scratch, unlabelled,
         pseudo_rounds, no_plain, crop_letterbox, settings, cache, keep, out) -> None:
    repo = Path(__file__).resolve().parents[1]
    scratch_dir = tempfile.TemporaryDirectory()
    given = list(models_given) or ["models/model.pt"]
    models = [packaged_trunk(Path(scratch_dir.name) / "ddddocr-trunk.pt", repo) if m == TRUNK else Path(m)
              for m in given]
    trunk = given[0] == TRUNK
    seed_list = [int(s) for s in seeds.split(",")]
    common = dict(parse_override(s) for s in settings)
    if epochs:
        common |= {"train.epochs": epochs, "train.max_minutes": 0.0}
    runs = [parse_variant(v) for v in variants] or ([] if no_plain else [("fine-tuned", {})])
    if unlabelled:
        runs.append((f"self-trained +{unlabelled}", {"unlabelled": unlabelled}))
    report = {"date": time.strftime("%Y-%m-%d"), "n": n, "models": given, "minutes": minutes, "epochs": epochs,
              "seeds": seed_list, "settings": common, "host": host_kind(), "styles": {}, "runs": []}
    for name in styles.split(","):
        test = render_style(name, "test", n, cache=cache)
        if crop_letterbox:
            test = [(label, crop_letterbox_of(png)) for label, png in test]
        labels, images = [t for t, _ in test], [png for _, png in test]
        row = report["styles"][name] = {}

        def score(key: str, readings: list[str], note: str = "") -> float:
            row[key] = accuracy(labels, readings)
            row.setdefault("doubled read once", {})[key] = doubled_read_once(labels, readings)
            print(f"{name}: {key}: {row[key]:.3f}{note}", flush=True)
            return row[key]

        for label_given, model in zip(given, models):
            readings, ms = read_with_model(model, images, ALPHABETS[name])
            score(f"zero-shot {label_given}", readings, f" ({ms:.1f} ms/img)")
        if with_ddddocr:
            readings, row["ddddocr_ms"] = read_with_ddddocr(images, ALPHABETS[name])
            score("ddddocr", readings, f" ({row['ddddocr_ms']:.1f} ms/img)")
        for n_labels in finetune:
            for what, variant in runs + ([("scratch", {"scratch": True})] if scratch else []):
                scores = []
                for seed in seed_list:
                    kept = keep / f"{name}-{what.replace(' ', '_')}-{n_labels}-s{seed}.pt" if keep else None
                    result = fine_tune_run(name, n_labels, seed, variant, common, models, trunk, minutes,
                                           pseudo_rounds, crop_letterbox, cache, repo, images, kept)
                    readings = result.pop("readings")
                    scores.append(score(f"{what} {n_labels} seed {seed}", readings,
                                        f" ({result['minutes_with_ingest']} min with ingest)"))
                    confusions = compute_metrics([t.upper() for t in labels], readings)["top_confusions"]
                    report["runs"].append({"style": name, "variant": what, "settings": variant, "labels": n_labels,
                                           "seed": seed, "test_accuracy": scores[-1], "confusions": confusions,
                                           **result})
                    write_json(out, report)
                row[f"{what} {n_labels}"] = sum(scores) / len(scores)
        write_json(out, report)
    print(format_table(report))


def fine_tune_run(style: str, n_labels: int, seed: int, variant: dict, common: dict, models: list[Path], trunk: bool,
                  minutes: float, pseudo_rounds: int, crop: bool, cache: Path | None, repo: Path,
                  test_images: list[bytes], keep: Path | None = None) -> dict:
    """One fine-tune of a variant on `n_labels` captchas of seed `seed`, read on the test images
    (the checkpoint copied to `keep` when given)."""
    variant = dict(variant)
    n_unlabelled, from_scratch = int(variant.pop("unlabelled", 0)), bool(variant.pop("scratch", False))
    train = render_style(style, "train", n_labels, seed, cache)
    extra = [png for _, png in render_style(style, "unlabelled", n_unlabelled, seed, cache)]
    if crop:
        train = [(label, crop_letterbox_of(png)) for label, png in train]
        extra = [crop_letterbox_of(png) for png in extra]
    start = None if from_scratch else models[0]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        tuned = fine_tune(start, models[0], train, minutes, Path(tmp), repo, trunk=trunk and start is not None,
                          unlabelled=extra, pseudo_rounds=pseudo_rounds,
                          overrides={"train.seed": seed, **common, **variant})
        took = time.perf_counter() - started
        readings, _ = read_with_model(tuned, test_images, ALPHABETS[style])
        if keep:
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tuned, keep)
        return {"readings": readings, "minutes_with_ingest": round(took / 60, 2), **run_report(Path(tmp))}


def format_table(report: dict) -> str:
    columns = list(dict.fromkeys(k for row in report["styles"].values() for k, v in row.items()
                                 if isinstance(v, float) and not k.endswith("_ms") and " seed " not in k))
    out = ["| style | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in report["styles"].items():
        out.append(f"| {name} | " + " | ".join(f"{100 * row[c]:.1f}%" if c in row else "" for c in columns) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
