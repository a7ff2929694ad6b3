"""A web page to trick the network: upload a photo (or pick a sample), name a target class, and see the attack, what a
defense does to it, and the adaptive attack that gets through that defense.

    python app.py [--model efficientnet_lite0] [--port 7860] [--host 127.0.0.1] [--workers 2] [--max-queue 8]
                                                                                    (or: make app)

The page is a form over step 7's command line: its defaults and range checks judge the numbers (Choices; no command
line is built), and the same functions run (step 2 to classify, step 7's experiment utils.adaptive.break_defense, utils.figures). As in the
scripts, every prediction shown after an attack is of the PNG written and read back, the file offered for download.
Bad input gets one clear message on the page. It runs offline on EfficientNet-Lite0 by default; Gradio's telemetry is
off.

Several users at once: --workers attacks run at a time (they share the frozen model, which only reads its weights;
each request has its own seeded generators, defense and figures), up to --max-queue more wait, and a request past
that is told at once that the page is busy (Gradio's "queue is full" message) instead of waiting without end. Each
answer's files live in a folder of their own, removed as soon as Gradio has copied them into its cache (which it
prunes hourly), so the page's own temporary folder holds only the files of the requests being answered. An upload
over MAX_MEGAPIXELS (or over MAX_UPLOAD) is refused with a message before it is decoded.
"""
import argparse
import contextlib
import functools
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it reads this once, at import

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from step_2_pretrained import (OFFLINE_MODEL, find_class, get_device, get_label, load_model,  # noqa: E402
                               model_from_args, predict_images, prepare_image, to_tensor, top_k)
from utils.adaptive import break_defense  # noqa: E402
from utils.attacks import ATTACKS, NORMS, perturbation_size  # noqa: E402
from utils.certify.smoothing_page import PAGE_N, page_certificate  # noqa: E402
from utils.cli import ArgumentParser, UsageError, number_in, one_of, run  # noqa: E402
from utils.defenses import DEFENSES, describe  # noqa: E402
from utils.figures import comparison_figure, defense_figure, short  # noqa: E402
from utils.files import save_figure  # noqa: E402
from utils.flags import (DEFAULT_EPSILON, add_model_arguments, check_budget, positive_number,  # noqa: E402
                         resolve_threat)
from utils.threat import NAMES, UNITS, check_methods, size_text  # noqa: E402
from utils.models import PROBE_SIZE  # noqa: E402
from utils.samples import sample_paths  # noqa: E402

MAX_STEPS = 500  # a page answers in minutes at most; the scripts take more
# An upload is decoded whole before it is resized: 40 megapixels (a large phone photo) is 120 MB of RGB per request,
# under PIL's own decompression-bomb limit of about 89
MAX_MEGAPIXELS = 40
MAX_UPLOAD = "50mb"  # Gradio refuses a larger file before it is stored
SAMPLES = {path.name: path for path in sample_paths()}
WORK = tempfile.TemporaryDirectory(prefix="tnn-app-")  # the answers' folders; removed when the server stops


def as_typed(value):
    """A form value as it would be typed on the command line (a slider's 4.0 is "4")."""
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, (int, float)) else str(value).strip()


def as_page_text(error):
    """A UsageError's "--epsilon must be ..." as a page says it: "epsilon must be ..."."""
    return UsageError(re.sub(r"--(\w)", r"\1", str(error)))


@dataclass(frozen=True)
class Choices:
    """The page's choices, checked, as the library's parameters: step 7's defaults for everything the page does not
    ask (untargeted no, early stop, one restart, seed 0, fp32)."""
    target: str
    epsilon: float
    steps: int
    method: str
    defense: str
    model: str
    classes: str = None
    input_size: int = None
    norm: str = "Linf"

    def attack_options(self):
        """utils.attacks.make_attack's keyword arguments, as step 7 builds them from its default flags."""
        return dict(epsilon=self.epsilon, steps=self.steps, targeted=True, early_stop=True, random_start=False,
                    restarts=1, seed=0, precision="fp32", norm=self.norm)


def checked(value, parse):
    """A form value through the check the command line gives it (utils.cli.number_in, one_of, ...), typed as it
    would be typed there; its complaint as a page says it."""
    try:
        return parse(as_typed(value))
    except argparse.ArgumentTypeError as error:
        raise as_page_text(error) from None


def settings(target, epsilon, steps, method, defense, model_name, classes=None, input_size=None, norm="Linf"):
    """The page's choices as Choices, checked as step 7 checks its flags: the same ranges and messages (the norm and
    its epsilon's range too: utils.flags.resolve_threat)."""
    epsilon = checked(epsilon, positive_number("epsilon"))
    steps = checked(steps, number_in(1, 100000, int, name="steps"))
    method = checked(method, one_of(sorted(ATTACKS), "method"))
    norm = checked(norm or "Linf", one_of(NORMS, "norm"))
    input_size = checked(input_size, number_in(8, 4096, int, name="input-size")) if input_size else None
    try:
        norm, epsilon = resolve_threat(model_name, norm, epsilon, DEFAULT_EPSILON)
        check_methods([method], norm)
    except UsageError as error:
        raise as_page_text(error) from None
    target = as_typed(target)
    if not target:
        raise UsageError("type a target class, e.g. goldfish (or its index, 1)")
    if steps > MAX_STEPS:
        raise UsageError(f"steps must be at most {MAX_STEPS} on this page, got {steps}")
    describe(defense)  # an unknown defense is named before any work
    return Choices(target, epsilon, steps, method, defense, model_name, classes or None, input_size, norm)


def load_photo(upload, sample, model):
    """The photo as the model sees it; a bad upload is named by its file name, not by where the server keeps it."""
    path = photo_path(upload, sample)
    try:
        check_size(path)
        return prepare_image(path, model)
    except UsageError as error:
        raise UsageError(str(error).replace(str(path), path.name))


def check_size(path):
    """UsageError for a photo over MAX_MEGAPIXELS, read from its header before any pixel is decoded; a file PIL
    cannot open is left to prepare_image to name."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is judged here, below PIL's
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError as error:  # declared over twice PIL's limit: PIL refuses to even open it
        raise UsageError(f"{path}: refused as a possible decompression bomb ({error}); this page takes photos up to "
                         f"{MAX_MEGAPIXELS} megapixels")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return
    if width * height > MAX_MEGAPIXELS * 1_000_000:
        raise UsageError(f"{path}: {width} x {height} is {width * height / 1e6:.1f} megapixels; this page takes photos "
                         f"up to {MAX_MEGAPIXELS} megapixels")


def uploaded_path(payload):
    """The uploaded photo's path, the file unopened; a photo sent inline (a data: URL) is refused, since reading it
    would decode it."""
    if payload is None:
        return None
    if payload.path is None or (payload.url or "").startswith("data:"):
        raise gr.Error("send the photo as an uploaded file", print_exception=False)
    return payload.path


def photo_input(**options):
    """An upload shown on the page as the picture it is (the browser draws it from the uploaded file) and handed to
    the attack as that file's path, so that check_size judges it from its header first. gr.Image's own preprocessing
    would open the file, where PIL refuses a declared bomb with no message of ours, and convert a photo that is not
    RGB already (with alpha, grey, CMYK), decoding every pixel of an oversized one. Replaced on the instance: a
    subclass of a Gradio component makes Gradio write a .pyi stub beside this file."""
    photo = gr.Image(type="filepath", sources=["upload"], **options)
    photo.preprocess = uploaded_path
    return photo


@contextlib.contextmanager
def answer_folder():
    """A folder for one answer's files, removed when the answer is done with."""
    folder = Path(tempfile.mkdtemp(dir=WORK.name))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def photo_path(upload, sample):
    if upload:
        return Path(upload)
    if sample:
        if sample not in SAMPLES:
            raise UsageError(f"unknown sample {sample!r}; choose from {', '.join(SAMPLES)}")
        return SAMPLES[sample]
    raise UsageError("upload a photo or pick a sample")


def top_classes(model, image, k=5):
    """{class name: probability} of step 2's top `k` (step_2_pretrained.top_k), as gr.Label shows them."""
    return {get_label(index, model.classes): value for index, value in top_k(model, image, k)}


def show_progress(progress, what, total, classes):
    def on_step(step, loss, logits):
        progress((step + 1, total), desc=f"{what}: loss {loss.mean().item():.2f}, "
                                         f"class {short(get_label(logits.argmax(dim=1)[0], classes))}")
    return on_step


def trick(upload, sample, target, epsilon, steps, method, defense, model_name=OFFLINE_MODEL, classes=None,
          input_size=None, norm="Linf", certify=False, progress=gr.Progress()):
    """Everything the page shows, from its inputs, yielded once; bad input raises UsageError. A generator so that its
    files outlive the return: Gradio asks a generator for its next value only after it has sent (and copied into its
    cache) the one before, and then this answer's folder goes."""
    with answer_folder() as out:
        yield answer(upload, sample, target, epsilon, steps, method, defense, (model_name, classes, input_size),
                     progress, out, norm, certify)


def answer(upload, sample, target, epsilon, steps, method, defense, model_spec, progress, out, norm="Linf",
           certify=False):
    """The page's outputs, its files written into the folder `out`; model_spec: (--model, --classes, --input-size)."""
    args = settings(target, epsilon, steps, method, defense, *model_spec, norm=norm)
    model = load_model(args.model, get_device("auto"), classes=args.classes, input_size=args.input_size)
    goal = find_class(args.target, model.classes)
    label = functools.partial(get_label, classes=model.classes)
    image = load_photo(upload, sample, model)
    try:
        check_budget(args.epsilon, args.norm, (3, *image.shape[:2]))
    except UsageError as error:
        raise as_page_text(error) from None
    result = break_defense(model, image, goal, args.method, args.attack_options(), args.defense, {}, out,
                           on_plain_step=show_progress(progress, f"{args.method} attack", args.steps, model.classes),
                           on_adaptive_step=show_progress(progress, "adaptive attack", args.steps, model.classes),
                           names=("adversarial.png", "adaptive.png"))
    (plain, adaptive), (plain_png, adaptive_png), (plain_steps, adaptive_steps) = result.images, result.files, result.steps
    (plain_before, adaptive_before), (plain_after, adaptive_after) = result.before, result.after
    old = predict_images(model, [image])[0]

    size = size_text(perturbation_size(to_tensor(plain), to_tensor(image), args.norm).item(), args.norm)
    size = f"at most {size} of 255 levels changed" if args.norm == "Linf" else \
        (f"{NAMES[args.norm]} size {size} "
         f"of {args.epsilon:g} ({UNITS[args.norm]})")
    comparison = save_figure(comparison_figure(image, plain, label(old), label(plain_before)), out / "comparison.png")
    rows = [("plain attack", plain, label(plain_before), result.defended[0], label(plain_after)),
            ("adaptive attack (BPDA)", adaptive, label(adaptive_before), result.defended[1], label(adaptive_after))]
    through = save_figure(defense_figure(rows), out / "break_defense.png")
    verdict = (f"**New prediction:** {label(plain_before)}  \n"
               f"{'Fooled' if plain_before == goal else 'Not fooled'}: target {label(goal)}, {plain_steps} "
               f"{args.method} steps, {size}; judged on the PNG below, read back.")
    if certify:  # opt-in: PAGE_N more forward passes
        verdict += "  \n" + page_certificate(model, image, plain)
    name = describe(args.defense)
    defense_report = (f"**After {name}:** the plain attack's PNG is {label(plain_after)} "
                      f"({'the attack survives' if plain_after == goal else 'the defense undoes it'}).  \n"
                      f"**Adaptive attack** (BPDA through {args.defense}, {adaptive_steps} steps): "
                      f"{label(adaptive_before)} before the defense, {label(adaptive_after)} after it "
                      f"({'it gets through' if adaptive_after == goal else 'not through; try more steps or a larger epsilon'}).")
    return top_classes(model, image), verdict, str(comparison), str(plain_png), defense_report, str(through), str(adaptive_png)


def on_page(function):
    """Bad input as a message on the page (Gradio shows a gr.Error's text), never a traceback."""
    @functools.wraps(function)  # Gradio reads the signature to find, and pass, the progress tracker
    def answers(*inputs):
        try:
            yield from function(*inputs)
        except UsageError as error:
            raise gr.Error(str(error), print_exception=False)
    return answers


def build_page(model_name=OFFLINE_MODEL, classes=None, input_size=None):
    labels = list(load_model(model_name, get_device("auto"), classes=classes, input_size=input_size).classes)
    with gr.Blocks(title="Trick a neural network", delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"# Trick a neural network\nUpload a photo, name a class, and {model_name} will see that class "
                    "in a photo that looks unchanged. Then a defense, and an attack that gets through it.")
        with gr.Row():
            with gr.Column():
                upload = photo_input(label="Your photo", height=260, elem_id="photo")
                sample = gr.Dropdown(list(SAMPLES), value=None, label="...or pick a sample", elem_id="sample")
                target = gr.Dropdown(labels, value=labels[min(1, len(labels) - 1)], allow_custom_value=True,
                                     label="Target class (type to search)", elem_id="target")
                norm = gr.Dropdown([(f"{NAMES[n]}", n) for n in NORMS], value="Linf", label="Threat model (norm)",
                                   elem_id="norm")
                # a number, not a slider: its meaning changes with the norm (levels per pixel, or the norm of the whole
                # perturbation), and the same checks as the command line's judge it
                epsilon = gr.Number(value=8, label="Epsilon (L-infinity: levels of 255 each pixel may change; L2, "
                                    "L1: norm of the whole perturbation in [0, 1] units, e.g. 3)", elem_id="epsilon")
                steps = gr.Slider(1, 200, value=20, step=1, label="Steps", elem_id="steps")
                method = gr.Dropdown(sorted(ATTACKS), value="pgd", label="Attack", elem_id="method")
                defense = gr.Dropdown(list(DEFENSES), value="jpeg", label="Defense", elem_id="defense")
                certify = gr.Checkbox(False, label=f"Also certify: randomized smoothing's provable L2 radius (costs "
                                                   f"{PAGE_N} more predictions, of noisy copies)", elem_id="certify")
                button = gr.Button("Trick it", variant="primary", elem_id="trick")
            with gr.Column():
                clean = gr.Label(num_top_classes=5, label="What the model sees (top 5)", elem_id="clean")
                verdict = gr.Markdown(elem_id="verdict")
                comparison = gr.Image(label="original | adversarial | perturbation magnified", show_label=False,
                                      height=260, format="png", elem_id="comparison")
                download = gr.File(label="The adversarial PNG", elem_id="download")
        with gr.Row():
            with gr.Column():
                defense_report = gr.Markdown(elem_id="defense-report")
                adaptive_download = gr.File(label="The adaptive attack's PNG", elem_id="adaptive-download")
            with gr.Column():
                through = gr.Image(label="before and after the defense", show_label=False, height=420,
                                   format="png", elem_id="through")
        model = [gr.State(model_name), gr.State(classes), gr.State(input_size)]
        button.click(on_page(trick), [upload, sample, target, epsilon, steps, method, defense, *model, norm, certify],
                     [clean, verdict, comparison, download, defense_report, through, adaptive_download])
    return page


def warm_up(model):
    """One forward before requests share the model: its first lays the weights out in their memory format, which no
    two requests should race to do."""
    size = model.preprocessing.crop_size or PROBE_SIZE  # a model file that takes images as they are: any size
    predict_images(model, [np.zeros((size, size, 3), np.uint8)])


def main(args):
    model = model_from_args(args, get_device("auto"))  # a bad --model is named here, before the server starts
    warm_up(model)
    page = build_page(args.model, args.classes, args.input_size)
    page = page.queue(default_concurrency_limit=args.workers, max_size=args.max_queue)
    print(f"Open http://{args.host}:{args.port} in a browser (Ctrl-C stops it)", flush=True)
    page.launch(server_name=args.host, server_port=args.port, quiet=True, max_file_size=MAX_UPLOAD)


def get_args_parser():
    parser = ArgumentParser(description="A local web page to trick a neural network with your own photo.")
    add_model_arguments(parser, default=OFFLINE_MODEL)
    parser.add_argument("--port", type=number_in(1, 65535, int, name="--port"), default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    parser.add_argument("--workers", type=number_in(1, 64, int, name="--workers"), default=2,
                        help="attacks computed at a time (default: %(default)s)")
    parser.add_argument("--max-queue", type=number_in(1, 10000, int, name="--max-queue"), default=8,
                        help="requests that may wait for a worker; one more is told the page is busy "
                             "(default: %(default)s)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
