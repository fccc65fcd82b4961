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
from scratch.

    python -m benchmarks.yardstick --model ddddocr --ddddocr --finetune 1000 --minutes 10 [--unlabelled 10000]

Needs the ddddocr extra (make install installs it).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import multiprocessing
import os
import random
import shutil
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from pipeline.data.captcha_style import Renderer
from pipeline.data.seeds import derive_seed
from pipeline.files import write_json
from pipeline.model import checkpoint
from pipeline.model.settings import load_model_params as load_params
from pipeline.params import parse_value, read_yaml
from pipeline.read.recognizer import Recognizer
from pipeline.system_files import DEJAVU, LIBERATION

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
        _, image = Claptcha(label, f"{LIBERATION}/LiberationSerif-Regular.ttf", size=(200, 80), noise=0.3).image
    return label, image


def wheezy_style(label_rng, seed):
    from wheezy.captcha import image as wz

    label = random_label(label_rng, ALNUM, (4, 5))
    draw = wz.captcha(drawings=[
        wz.background(), wz.text(fonts=[f"{LIBERATION}/LiberationSans-Bold.ttf"],
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
    renderer = Renderer(180, 60, [f"{DEJAVU}/DejaVuSerif.ttf", f"{DEJAVU}/DejaVuSerif-Bold.ttf"], [40, 46])
    return label, renderer.image(label, seed)


def digits_style(label_rng, seed):
    label = random_label(label_rng, string.digits, (4, 6))
    rng = random.Random(seed)
    font = ImageFont.truetype(f"{LIBERATION}/LiberationSans-Regular.ttf", rng.randint(24, 30))
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


def crop_letterbox(png: bytes) -> bytes:
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


def render_style(name: str, split: str, n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """n (label, PNG bytes) of a style; a thousand or more on every core (each image is a pure
    function of its seeds, so the same whatever the processes)."""
    jobs = [(name, split, i, seed) for i in range(n)]
    if n < 1000 or (os.cpu_count() or 1) == 1:
        return [render_one(*job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        return pool.starmap(render_one, jobs, chunksize=64)


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
              pseudo_rounds: int = 0, overrides: dict[str, str] | None = None,
              labels_csv: Path | None = None) -> Path:
    """Ingest `train` and train on it alone for `minutes` with the shipped fine-tune profile
    (profiles/finetune.yaml) in `workdir`: with `trunk`, from the packaged ddddocr trunk as the
    profile ships; else from `model`, or from scratch with the architecture of `pretrained_like`.
    With `labels_csv`, ingest reads its folder with it instead of `train`. Returns the new checkpoint."""
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
    for key, value in (overrides or {}).items():  # --set section.key[.sub]=value
        *path, last = key.split(".")
        node = params
        for part in path:
            node = node[part]
        node[last] = parse_value(value)
    if model is not None and not trunk:
        (workdir / "pretrained").mkdir()
        shutil.copy(model, workdir / "pretrained/model.pt")
        params["train"]["init_from"] = "pretrained/model.pt"
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        loaded = load_params(Path("params.yaml"))
        ingest(loaded.data, loaded.ingest, skip_invalid=True)
        run_train(loaded, progress=False)
    finally:
        os.chdir(cwd)
    return workdir / "models/model.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append",
                        help=f"checkpoint(s) to score zero-shot, or {TRUNK!r}: the packaged trunk; the first is fine-tuned")
    parser.add_argument("--n", type=int, default=500, help="test images per style")
    parser.add_argument("--styles", default=",".join(STYLES))
    parser.add_argument("--ddddocr", action="store_true", help="score ddddocr too")
    parser.add_argument("--finetune", type=int, action="append", default=[], help="labelled images to fine-tune on")
    parser.add_argument("--minutes", type=float, default=5.0, help="training minutes per fine-tune")
    parser.add_argument("--scratch", action="store_true", help="also train from scratch on the same images")
    parser.add_argument("--unlabelled", type=int, default=0,
                        help="also fine-tune with this many unlabelled captchas of the style (self-training)")
    parser.add_argument("--pseudo-rounds", type=int, default=2, help="self-training rounds with --unlabelled")
    parser.add_argument("--no-plain", action="store_true", help="with --unlabelled: skip the fine-tune without them")
    parser.add_argument("--crop-letterbox", action="store_true",
                        help="cut every image to the box unlike its corner first (multicolor's letterbox)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params value for the fine-tunes, e.g. model.ddddocr.width=256")
    parser.add_argument("--out", type=Path, default=Path("reports/yardstick.json"))
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    scratch_dir = tempfile.TemporaryDirectory()
    models = [packaged_trunk(Path(scratch_dir.name) / "ddddocr-trunk.pt", repo) if str(m) == TRUNK else m
              for m in (args.model or [Path("models/model.pt")])]
    trunk = str((args.model or [""])[0]) == TRUNK
    report = {"date": time.strftime("%Y-%m-%d"), "n": args.n, "models": [str(m) for m in args.model or models],
              "minutes": args.minutes, "styles": {}}
    for name in args.styles.split(","):
        test = render_style(name, "test", args.n)
        if args.crop_letterbox:
            test = [(label, crop_letterbox(png)) for label, png in test]
        labels, images = [t for t, _ in test], [png for _, png in test]
        row = report["styles"][name] = {}

        def score(key: str, readings: list[str], note: str = "") -> None:
            row[key] = accuracy(labels, readings)
            row.setdefault("doubled read once", {})[key] = doubled_read_once(labels, readings)
            print(f"{name}: {key}: {row[key]:.3f}{note}", flush=True)

        for given, model in zip(args.model or models, models):
            readings, ms = read_with_model(model, images, ALPHABETS[name])
            score(f"zero-shot {given}", readings, f" ({ms:.1f} ms/img)")
        if args.ddddocr:
            readings, row["ddddocr_ms"] = read_with_ddddocr(images, ALPHABETS[name])
            score("ddddocr", readings, f" ({row['ddddocr_ms']:.1f} ms/img)")
        for n_labels in args.finetune:
            train = render_style(name, "train", n_labels)
            unlabelled = [png for _, png in render_style(name, "unlabelled", args.unlabelled)]
            if args.crop_letterbox:
                train = [(label, crop_letterbox(png)) for label, png in train]
                unlabelled = [crop_letterbox(png) for png in unlabelled]
            runs = [] if args.no_plain else [("fine-tuned", models[0], [])]
            runs += [("scratch", None, [])] if args.scratch else []
            runs += [(f"self-trained +{args.unlabelled}", models[0], unlabelled)] if unlabelled else []
            for what, start, extra in runs:
                with tempfile.TemporaryDirectory() as tmp:
                    started = time.perf_counter()
                    tuned = fine_tune(start, models[0], train, args.minutes, Path(tmp), repo,
                                      trunk=trunk and start is not None, unlabelled=extra,
                                      pseudo_rounds=args.pseudo_rounds,
                                      overrides=dict(kv.split("=", 1) for kv in args.set))
                    took = time.perf_counter() - started
                    readings, _ = read_with_model(tuned, images, ALPHABETS[name])
                score(f"{what} {n_labels}", readings, f" ({args.minutes} min budget, {took / 60:.1f} min with ingest)")
                row.setdefault("minutes with ingest", {})[f"{what} {n_labels}"] = round(took / 60, 2)
        write_json(args.out, report)
    print(format_table(report))


def format_table(report: dict) -> str:
    columns = list(dict.fromkeys(k for row in report["styles"].values() for k, v in row.items()
                                 if isinstance(v, float) and not k.endswith("_ms")))
    out = ["| style | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in report["styles"].items():
        out.append(f"| {name} | " + " | ".join(f"{100 * row[c]:.1f}%" if c in row else "" for c in columns) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
