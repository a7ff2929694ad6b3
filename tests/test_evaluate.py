"""Step 8's evaluation, end to end on two real photos with the offline model and a tiny grid; every number it
writes is re-measured here from the saved PNGs."""
import csv
import functools
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import step_2_pretrained
import step_8_evaluate
from utils import files
from utils.models import find_class, predict_images, prepare_image
from step_8_evaluate import DEFAULT_ENSEMBLE, get_args_parser, main
from utils.evaluation import engine
from utils.evaluation.plan import CLEAN, make_plan
from utils.evaluation.results import COLUMNS
from tests.conftest import GRACE_HOPPER, OFFLINE, REPO, make_tiny_model, run_main, run_script, run_tool
from tests.test_tutorial_units import tiny_png_header, truncated_jpeg
from utils.attacks import ATTACKS
from utils.cli import UsageError, run
from utils.data import csv_labels, imagenet_val_labels
from utils.defenses import make_defense
from utils.samples import sample_paths

GRID = ("--model", OFFLINE, "--methods", "fgsm,pgd", "--epsilons", "2,16", "--steps", "1,2", "--threads", "1")
GOLDFISH = 1
# fgsm once per epsilon, pgd per epsilon x steps, pgd at 2x the largest steps (largest epsilon), pgd at epsilon 255
ROWS_PER_PHOTO = 2 + 2 * 2 + 1 + 1


def read_rows(folder):
    with open(folder / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def evaluate(photos, out, *args):
    """Step 8 on the photos with the grid, its command line run in this process (conftest's run_main: the rows and
    bytes a fresh process writes, without its start-up and model load); step 8's fresh-process run is
    test_defenses_plain_and_adaptive, on this evaluation's output."""
    result = run_main(step_8_evaluate, photos, *GRID, "--output-dir", out, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_script():
    """The scripts run with one torch thread: on 2 cores shared with other work, two threads wait on each other
    (measured here: 97 s with two threads against 9 s with one for the evaluation below)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "photos"
    folder.mkdir()
    chelsea = next(path for path in sample_paths() if path.name == "chelsea.png")
    for path in (GRACE_HOPPER, chelsea):
        shutil.copyfile(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def evaluated(photos):
    out = photos.parent / "out"
    evaluate(photos, out)
    return out


def copy_of(evaluated, name):
    copy = evaluated.parent / name
    shutil.copytree(evaluated, copy)
    return copy


def test_writes_every_output(evaluated, photos):
    for name in ("results.csv", "summary.md", "success_vs_epsilon.png", "success_vs_steps.png"):
        assert (evaluated / name).stat().st_size > 0, name
    rows = read_rows(evaluated)
    assert len(rows) == 2 * ROWS_PER_PHOTO
    assert {row["image"] for row in rows} == {"grace_hopper.jpg", "chelsea.png"}
    assert {(row["method"], row["epsilon"], row["steps"]) for row in rows if row["method"] == "fgsm"} == \
           {("fgsm", "2", "1"), ("fgsm", "16", "1")}, "fgsm is one step: once per epsilon"
    assert {row["steps"] for row in rows if row["method"] == "pgd"} == {"1", "2", "4"}
    assert {(row["defense"], row["attack"]) for row in rows} == {("none", "plain")}
    files = {row["file"] for row in rows}
    assert len(files) == len(rows), "every adversarial PNG has its own name"
    assert not (evaluated / "defenses.png").exists()


def test_budget_and_success_remeasured_from_the_pngs(evaluated, photos, offline_model):
    rows = read_rows(evaluated)
    originals = {path.name: prepare_image(path, offline_model) for path in photos.iterdir()}
    saved = [np.asarray(Image.open(evaluated / row["file"]).convert("RGB")).astype(int) for row in rows]
    for row, image in zip(rows, saved):
        assert image.shape == originals[row["image"]].shape
        linf = int(np.abs(image - originals[row["image"]]).max())
        assert linf == int(row["linf"]) <= float(row["epsilon"]), row
    finals = predict_images(offline_model, [prepare_image(evaluated / row["file"], offline_model) for row in rows])
    cleans = predict_images(offline_model, [originals[row["image"]] for row in rows])
    for row, final, clean in zip(rows, finals, cleans):
        assert int(row["final_label"]) == final and int(row["clean_label"]) == clean, row
        assert row["success"] == str(int(final == GOLDFISH)), row
    assert any(row["success"] == "1" for row in rows) and any(row["success"] == "0" for row in rows), \
        "the tiny grid should hold both outcomes, or the agreement above proves little"


def test_bf16_gradients_still_give_fp32_verdicts_on_the_files(photos, tmp_path, offline_model):
    """--precision bf16 (here with --memory-format contiguous) reaches step 8's attacks: their rows are judged like any
    other, by the fp32 model on the PNG read back, so every success written is a success of the file."""
    out = tmp_path / "bf16"
    result = run_script("step_8_evaluate.py", photos, "--model", OFFLINE, "--methods", "pgd", "--epsilons", "16",
                        "--steps", "2", "--threads", "1", "--precision", "bf16", "--memory-format", "contiguous",
                        "--output-dir", out, cwd=photos.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory format contiguous, precision bf16;" in (out / "summary.md").read_text(), "what was asked, recorded"
    rows = read_rows(out)
    finals = predict_images(offline_model, [prepare_image(out / row["file"], offline_model) for row in rows])
    assert [row["success"] for row in rows] == [str(int(final == GOLDFISH)) for final in finals]
    assert any(row["success"] == "1" for row in rows), "a bf16 attack at epsilon 16 fools something"


def success_rate(rows, *setting):
    """The success rate over the two photos of (method, epsilon, steps), all as written in results.csv."""
    picked = [int(row["success"]) for row in rows if (row["method"], row["epsilon"], row["steps"]) == setting]
    assert len(picked) == 2
    return sum(picked) / 2


def expected_verdicts(rows):
    """The four sanity checks, recomputed from results.csv."""
    rate = functools.partial(success_rate, rows)
    return [all(rate("pgd", e, "2") >= rate("fgsm", e, "1") for e in ("2", "16")),
            rate("fgsm", "16", "1") >= rate("fgsm", "2", "1") and rate("pgd", "16", "2") >= rate("pgd", "2", "2"),
            rate("pgd", "16", "4") == rate("pgd", "16", "2"),
            rate("pgd", "255", "2") == 1]


def verdicts(summary):
    found = re.findall(r"^(\d)\. \*\*(PASS|FAIL|N/A)\*\*", summary, flags=re.MULTILINE)
    assert [number for number, _ in found] == ["1", "2", "3", "4", "5"], summary
    return [verdict for _, verdict in found]


def test_summary_tables_and_sanity_checks(evaluated):
    summary = (evaluated / "summary.md").read_text()
    rows = read_rows(evaluated)
    assert verdicts(summary) == ["PASS" if ok else "FAIL" for ok in expected_verdicts(rows)] + ["N/A"]
    cells = next(line for line in summary.splitlines() if line.startswith("| pgd |")).split("|")
    assert cells[2].strip() == "2", "the table is at the largest steps"
    assert cells[4].strip() == f"{100 * success_rate(rows, 'pgd', '16', '2'):.1f}%"
    assert "| fgsm | 1 |" in summary
    assert "device cpu, memory format channels_last, precision fp32;" in summary, "the rule's format, recorded"


def without_seconds(rows):
    return [{column: value for column, value in row.items() if column != "seconds"} for row in rows]


def test_resume_recomputes_only_missing_rows(evaluated, photos):
    """Finished rows come from results.csv and from the shards of any rank; a torn last line and a row whose PNG is
    gone are redone, each with the whole batch it had, so the merged file and every PNG are the uninterrupted run's;
    the jobs whose batch was recorded whole are not touched."""
    out = copy_of(evaluated, "resumed")
    header, *body = (out / "results.csv").read_text().splitlines(keepends=True)
    # 8 jobs x 2 photos, one batch: rows 0-5 (jobs 1-3) in results.csv, jobs 4-5 in a shard, jobs 6-8 missing
    lost = next(csv.DictReader([header, body[2]]))
    (out / lost["file"]).unlink()  # its row stays in results.csv, but its PNG is gone: job 2 must be redone whole
    (out / "results.csv").write_text(header + "".join(body[:6]))
    (out / "shards").mkdir()
    (out / "shards" / "results.rank-1.csv").write_text(header + "".join(body[6:10]) + body[10][:40])
    kept = [row for row in csv.DictReader([header, *body[:10]]) if row["file"] != lost["file"]]
    redone_job = {row["file"] for row in csv.DictReader([header, *body[2:4]])}
    mtimes = {row["file"]: (out / row["file"]).stat().st_mtime_ns for row in kept if row["file"] not in redone_job}
    # a process killed between a PNG's temp file and its rename leaves the temp; a hidden file of the user's stays
    killed_write = files.temp_beside(out / lost["file"])
    users = out / "images" / ".notes.txt"
    users.write_text("mine")

    evaluate(photos, out, "--resume")
    assert not killed_write.exists(), "a killed write's temp file is no output: the resumed run removes it"
    assert users.read_text() == "mine"
    users.unlink()
    before, after = read_rows(evaluated), read_rows(out)
    assert without_seconds(after) == without_seconds(before), "every row once, in one process's order, same values"
    assert png_bytes(out) == png_bytes(evaluated), "the redone PNGs are the uninterrupted run's, byte for byte"
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in mtimes.items()), "kept PNGs untouched"
    assert not (out / "shards").exists()


def png_bytes(out):
    return {path.relative_to(out).as_posix(): path.read_bytes() for path in sorted((out / "images").rglob("*.png"))}


def test_resume_with_nothing_left_says_so(evaluated, photos):
    out = copy_of(evaluated, "nothing_left")
    result = evaluate(photos, out, "--resume")
    assert "Nothing left to do: every job had finished on all 2 photos (--resume)" in result.stdout
    assert "photos/s" not in result.stdout
    assert without_seconds(read_rows(out)) == without_seconds(read_rows(evaluated))


@pytest.mark.smoke
def test_defenses_plain_and_adaptive(evaluated, photos, offline_model):
    out = copy_of(evaluated, "defended")
    result = run_script("step_8_evaluate.py", photos, *GRID[:4], "--epsilons", "16", "--steps", "1,2", "--resume",
                        "--threads", "1", "--defenses", "jpeg", "--adaptive", "--output-dir", out, cwd=photos.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(out)
    assert len(rows) == 2 * ROWS_PER_PHOTO + 2 * 2, "the grid's rows kept, a plain and an adaptive row per photo added"
    defended = [row for row in rows if row["defense"] == "jpeg"]
    assert sorted((row["attack"], row["method"], row["steps"], row["epsilon"]) for row in defended) == \
           [("adaptive", "pgd", "2", "16")] * 2 + [("plain", "pgd", "2", "16")] * 2
    jpeg = make_defense("jpeg")
    for row in defended:
        back = prepare_image(out / row["file"], offline_model)
        original = prepare_image(photos / row["image"], offline_model)
        after, clean_after = predict_images(offline_model, [jpeg(back), jpeg(original)])
        assert int(row["defended_label"]) == after and int(row["clean_defended_label"]) == clean_after, row
        assert row["success"] == str(int(after == GOLDFISH)), row
        assert int(row["linf"]) <= float(row["epsilon"])
    plain = {(r["image"], r["epsilon"]): r["file"] for r in defended if r["attack"] == "plain"}
    bare = {(r["image"], r["epsilon"]): r["file"] for r in rows
            if (r["defense"], r["method"], r["steps"]) == ("none", "pgd", "2")}
    assert all(bare[key] == file for key, file in plain.items()), "the plain attack is judged on its own saved PNG"
    def percent(attack, hit):
        picked = [hit(row) for row in defended if row["attack"] == attack]
        return f"{100 * sum(picked) / len(picked):.1f}%"

    kept = percent("plain", lambda row: row["clean_defended_label"] == row["clean_label"])
    plain, adaptive = (percent(attack, lambda row: row["success"] == "1") for attack in ("plain", "adaptive"))
    summary = (out / "summary.md").read_text()
    assert f"| jpeg | 16 | {kept} | {plain} | {adaptive} |" in summary, summary
    assert "| method | steps | eps 16 |" in summary, "the summary covers this run's grid only"
    assert (out / "defenses.png").stat().st_size > 0


def test_without_resume_results_are_replaced(evaluated, photos):
    out = copy_of(evaluated, "replaced")
    result = run_script("step_8_evaluate.py", photos, "--model", OFFLINE, "--methods", "fgsm", "--epsilons", "2",
                        "--steps", "1", "--threads", "1", "--output-dir", out, cwd=photos.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(out)
    assert sorted((row["method"], row["epsilon"], row["steps"]) for row in rows) == \
           [("fgsm", "2", "1")] * 2 + [("pgd", "255", "1")] * 2
    assert verdicts((out / "summary.md").read_text())[0::2] == ["N/A", "N/A", "N/A"], "no iterative method, no ensemble"


@pytest.mark.parametrize("args", [
    ["missing"],
    ["empty"],
    ["photos", "--methods", "pgd,nope"],
    ["photos", "--epsilons", "0,2"],
    ["photos", "--epsilons", "2,256"],
    ["photos", "--steps", "0"],
    ["photos", "--defenses", "jpeg,nope"],
    ["photos", "--target", "no such class"],
    ["photos", "--target", "goldfish", "--untargeted"],
    ["photos", "--adaptive"],
    ["photos", "--precision", "fp16"],  # CPU autocast has no fp16: refused before anything is written
])
def test_bad_input_is_one_line_and_writes_nothing(args, photos, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a photo")
    places = {"photos": str(photos), "missing": str(tmp_path / "missing"), "empty": str(tmp_path / "empty")}
    argv = [places.get(arg, arg) for arg in args]
    with pytest.raises(SystemExit) as exit_:
        run(main, get_args_parser(),
            [*argv, "--model", OFFLINE, "--threads", "1", "--output-dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "error" in error and "Traceback" not in error, error
    assert not (tmp_path / "out").exists()


def test_bad_input_from_the_command_line(photos, tmp_path):
    result = run_script("step_8_evaluate.py", photos, "--methods", "fgsm,bogus", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "bogus" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.smoke
def test_sample_images_copies_real_photos(tmp_path):
    result = run_tool("tools.sample_images", "--output-dir", "samples", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    copied = sorted((tmp_path / "samples").iterdir())
    assert [path.name for path in copied] == sorted(path.name for path in sample_paths())
    assert len(copied) == 6
    for path in copied:
        with Image.open(path) as image:
            assert image.mode == "RGB" and min(image.size) >= 200


# ---- in-process runs on the tiny model: unreadable files, labels, the ensemble's flow ---------------------------

RED, GREEN, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (255, 255, 255), (0, 0, 0)
TINY = {RED: 643, GREEN: 892, WHITE: 404, BLACK: 151}  # what the tiny model (seed 0) predicts for solid colours


def solid(path, colour, size=40):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(path)
    return path


@pytest.fixture
def tiny(monkeypatch, capsys):
    """Run step 8's main in this process on the tiny model: returns (exit status, stderr)."""
    model = make_tiny_model()
    monkeypatch.setattr(step_2_pretrained, "load_model", lambda name, device, **options: model)

    def call(*argv):
        with pytest.raises(SystemExit) as exit_:
            run(main, get_args_parser(), [*map(str, argv), "--threads", "1"])
        return exit_.value.code, capsys.readouterr().err
    return call


def test_tiny_model_sees_what_the_planted_tests_assume(tmp_path):
    model = make_tiny_model()
    images = [prepare_image(solid(tmp_path / f"{k}.png", colour), model) for k, colour in enumerate(TINY)]
    assert predict_images(model, images) == list(TINY.values())


@pytest.fixture
def mixed(tmp_path):
    """Good photos, a truncated JPEG, a text file named .png and a decompression bomb."""
    folder = tmp_path / "mixed"
    solid(folder / "red.png", RED)
    solid(folder / "green.png", GREEN)
    truncated_jpeg(folder / "cut.jpg")
    (folder / "notes.png").write_text("this is not an image")
    (folder / "bomb.png").write_bytes(tiny_png_header(40000, 40000))
    return folder


def test_unreadable_files_are_skipped_and_listed(tiny, mixed, tmp_path):
    out = tmp_path / "out"
    status, err = tiny(mixed, "--methods", "fgsm", "--epsilons", "2", "--steps", "1", "--output-dir", out)
    assert status == 0, err
    for name, reason in (("cut.jpg", "truncated"), ("notes.png", "not an image"), ("bomb.png", "decompression bomb")):
        assert err.count(f"skipped {name}:") == 1 and reason in err, err
    summary = (out / "summary.md").read_text()
    assert "on 2 photos" in summary and "3 unreadable files, left out of every rate" in summary
    listed = [line for line in summary.splitlines() if line.startswith("- skipped: ")]
    assert [line.split()[2] for line in listed] == ["bomb.png", "cut.jpg", "notes.png"]
    assert "- skipped: cut.jpg (cannot read the image, it may be truncated" in summary
    assert {row["image"] for row in read_rows(out)} == {"red.png", "green.png"}


def test_strict_makes_the_first_unreadable_file_an_error(tiny, mixed, tmp_path):
    status, err = tiny(mixed, "--methods", "fgsm", "--strict", "--output-dir", tmp_path / "out")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "bomb.png" in err and "decompression bomb" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_folder_with_no_readable_image_is_an_error(tiny, tmp_path):
    folder = tmp_path / "bad"
    truncated_jpeg(folder.mkdir() or folder / "cut.jpg")
    (folder / "notes.png").write_text("this is not an image")
    status, err = tiny(folder, "--methods", "fgsm", "--output-dir", tmp_path / "out")
    assert status == 2 and "no readable image" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made: the refused run takes back what it wrote, not the folder
    status, err = tiny(folder, "--methods", "fgsm", "--output-dir", tmp_path / "mine")
    assert status == 2 and "no readable image" in err.strip().splitlines()[-1], err
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def labelled_folder(tmp_path, source):
    """A folder of two solid-colour photos labelled by `source`: (folder, extra arguments, {image: label})."""
    folder = tmp_path / source
    if source == "wordnet":
        solid(folder / "n01443537" / "red.png", RED)
        solid(folder / "n01440764" / "green.png", GREEN)
        return folder, [], {"n01443537/red.png": 1, "n01440764/green.png": 0}
    if source == "index":
        solid(folder / "643" / "red.png", RED)
        solid(folder / "7" / "green.png", GREEN)
        return folder, [], {"643/red.png": 643, "7/green.png": 7}
    if source == "imagenet-val":
        names = ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]
        for name, colour in zip(names, (RED, GREEN)):
            solid(folder / name, colour)
        return folder, ["--labels", "imagenet-val"], {name: imagenet_val_labels()[name] for name in names}
    solid(folder / "red.png", RED)
    solid(folder / "green.png", GREEN)
    solid(folder / "white.png", WHITE)
    (tmp_path / "labels.csv").write_text("image,label\nred.png,643\ngreen.png,n01440764\nwhite.png,goldfish\n")
    return folder, ["--labels", tmp_path / "labels.csv"], {"red.png": 643, "green.png": 0, "white.png": 1}


@pytest.mark.parametrize("source", ["wordnet", "index", "imagenet-val", "csv"])
def test_label_sources(source, tiny, tmp_path):
    folder, extra, labels = labelled_folder(tmp_path, source)
    out = tmp_path / "out"
    status, err = tiny(folder, *extra, "--ensemble", "fgsm,pgd", "--epsilons", "4", "--steps", "2",
                       "--output-dir", out)
    assert status == 0, err
    rows = read_rows(out)
    clean = {row["image"]: row for row in rows if row["attack"] == "clean"}
    assert {image: int(row["label"]) for image, row in clean.items()} == labels
    assert all(row["clean_correct"] == str(int(row["clean_label"] == row["label"])) for row in rows)
    assert {row["attack"] for row in rows} <= {"clean", "ensemble"}, "labels and no --methods: the ensemble only"
    accuracy = read_csv(out / "robust_accuracy.csv")
    assert list(accuracy[0]) == ["norm", "epsilon", "attack", "images", "clean_accuracy", "robust_accuracy"]
    assert [row["attack"] for row in accuracy] == ["fgsm", "pgd", "worst-case"]
    correct = sum(row["clean_correct"] == "1" for row in clean.values())
    assert all(float(row["clean_accuracy"]) == pytest.approx(correct / len(labels)) for row in accuracy)
    summary = (out / "summary.md").read_text()
    assert ("| epsilon | clean accuracy | robust accuracy after fgsm | robust accuracy after pgd | worst case |"
            in summary)


@pytest.mark.parametrize("layout, extra, message", [
    ({"n99999999/red.png": RED}, [], "unknown WordNet ID 'n99999999'"),
    ({"cats/red.png": RED}, [], "subfolder 'cats' is neither a WordNet ID"),
    ({"cats/red.png": RED}, [], "name class subfolders so, or give --labels\n"),
    ({"1000/red.png": RED}, [], "class index 1000 is out of range"),
    ({"red.png": RED}, ["--labels", "imagenet-val"], "red.png: not an ImageNet validation image name"),
    ({"red.png": RED}, ["--labels", "imagenet-val"], "so --labels imagenet-val has no label for it\n"),
    ({"red.png": RED, "green.png": GREEN}, ["--labels", "{csv}"], "no label for green.png"),
    ({"red.png": RED}, ["--labels", "{csv}", "row:blue.png,3"], "image 'blue.png' is not a photo of the folder"),
    ({"red.png": RED}, ["--labels", "{csv}", "row:red.png,1000"], "class index 1000 is out of range"),
    ({"red.png": RED}, ["--labels", "{csv}", "row:red.png,n00000000"], "unknown WordNet ID 'n00000000'"),
    ({"red.png": RED}, ["--labels", "{csv}", "row:red.png,unicorn"], "unknown class name 'unicorn'"),
    ({"red.png": RED}, ["--labels", "{tmp}/none.csv"], "no such labels file"),
    ({"red.png": RED}, ["--ensemble", "fgsm"],
     "--ensemble measures robust accuracy: it needs true labels (an ImageFolder tree or --labels)\n"),
    ({"7/red.png": RED}, ["--ensemble", "fgsm", "--target", "goldfish"],
     "--ensemble measures untargeted robustness: it excludes --target\n"),
    ({"7/red.png": RED}, ["--adaptive"], "--adaptive attacks through a defense: give --defenses too\n"),
    ({"7/red.png": RED}, ["--certify", "bounds", "--norm", "L2"],
     "--certify bounds certifies Linf, L1, not --norm L2\n"),
    ({"red.png": RED}, ["--certify", "bounds"], "--certify bounds the ensemble's robust accuracy from below: it needs "
                                                "true labels (an ImageFolder tree or --labels) and an ensemble\n"),
    ({"7/red.png": RED}, ["--ensemble", "fgsm,nope"], "unknown attack 'nope'"),
])
def test_bad_labels_are_one_line_and_write_nothing(layout, extra, message, tiny, tmp_path):
    folder = tmp_path / "photos"
    for name, colour in layout.items():
        solid(folder / name, colour)
    rows = [arg for arg in extra if arg.startswith("row:")]  # lines of the labels CSV
    (tmp_path / "labels.csv").write_text("image,label\nred.png,643\n" * ("{csv}" in extra and not rows)
                                         + "image,label\n" * bool(rows) + "".join(f"{row[4:]}\n" for row in rows))
    argv = [arg.replace("{csv}", str(tmp_path / "labels.csv")).replace("{tmp}", str(tmp_path))
            for arg in extra if arg not in rows]
    status, err = tiny(folder, *argv, "--epsilons", "2", "--steps", "1", "--output-dir", tmp_path / "out")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_the_plan_names_its_parameters_not_step_8s_flags():
    """make_plan and check_certify are library functions: their errors name the parameters; step 8 writes the flags
    (above)."""
    from utils.evaluation.interval import check_certify
    for options, message in (({"ensemble": ["fgsm"]}, "ensemble measures robust accuracy: it needs true labels (an "
                                                      "ImageFolder tree or labels)"),
                             ({"adaptive": True}, "adaptive attacks through a defense: give defenses too")):
        with pytest.raises(UsageError) as error:
            make_plan(False, [2.0], [1], "Linf", **options)
        assert str(error.value) == message
    with pytest.raises(UsageError, match=r"^certify bounds the ensemble's robust accuracy .* \(an ImageFolder tree or "
                                         r"labels\) and an ensemble$"):
        check_certify(["bounds"], False, [], "Linf")


def test_with_labels_and_no_methods_only_the_default_ensemble_runs():
    plan = make_plan(True, [2.0, 8.0], [10, 50], "Linf", queries=300)
    assert plan.target is None and plan.methods == [] and plan.ensemble == list(DEFAULT_ENSEMBLE)
    stages = [(job.method, job.epsilon, job.steps) for job in plan.jobs if job.attack == "ensemble"]
    assert stages == [("apgd", 2, 50), ("apgd-t", 2, 50), ("fab", 2, 50), ("square", 2, 300),
                      ("apgd", 8, 50), ("apgd-t", 8, 50), ("fab", 8, 50), ("square", 8, 300)], \
        "AutoAttack's standard version: APGD-CE, APGD-T, FAB-T, Square"
    assert plan.jobs[0] == CLEAN and len(plan.jobs) == 9
    with_grid = make_plan(True, [2.0], [10], "Linf", methods=["pgd"])
    assert with_grid.target is None and with_grid.methods == ["pgd"], "with labels the grid is untargeted"
    assert make_plan(False, [2.0], [10], "Linf").ensemble == []


def test_a_model_of_no_fixed_size_is_refused_before_any_output(monkeypatch, capsys, tmp_path):
    """Step 8 batches photos, so a model that takes images as they are needs --input-size: one line, exit 2."""
    from utils.models import Classifier, Preprocessing, freeze
    sizeless = freeze(Classifier(make_tiny_model().net, Preprocessing(None, (0.5,) * 3, (0.25,) * 3), "sizeless"))
    monkeypatch.setattr(step_2_pretrained, "load_model", lambda name, device, **options: sizeless)
    folder, extra, _ = labelled_folder(tmp_path, "index")
    with pytest.raises(SystemExit) as exit_:
        run(main, get_args_parser(), [str(folder), *map(str, extra), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "takes images as they are, and step 8 batches photos of any size: pass --input-size N" in err, err
    assert not (tmp_path / "out").exists()


def test_ensemble_fast_runs_its_two_stages_towards_three_classes(tiny, tmp_path):
    """--ensemble fast on the command line: summary.md's stages are APGD-CE's and APGD-T's alone, and
    evaluation.json records the three target classes (so --resume refuses a run with others)."""
    folder, extra, _ = labelled_folder(tmp_path, "index")
    status, err = tiny(folder, *extra, "--ensemble", "fast", "--epsilons", "2", "--steps", "2",
                       "--output-dir", tmp_path / "out")
    assert status == 0, err
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| robust accuracy after apgd | robust accuracy after apgd-t | worst case |" in summary, summary
    assert '"target_classes": 3' in (tmp_path / "out" / "evaluation.json").read_text()


def test_a_batch_recorded_in_part_runs_again_whole():
    """The rule behind an exact --resume: a job's rows for a batch count only when every photo it runs on has one; else
    it runs on the whole batch again (never on the lone photo: another batch composition gives other floats on CPU)."""
    plan = make_plan(False, [2.0], [2], "Linf", methods=["pgd"])
    job, photos = plan.jobs[0], SimpleNamespace(names=["a.png", "b.png", "c.png"])
    row = {"success": "0"}
    assert engine.still_to_run(job, [0, 1, 2], photos, plan, {}) == [0, 1, 2]
    assert engine.still_to_run(job, [0, 1, 2], photos, plan, {job.key("b.png"): row}) == [0, 1, 2]
    whole = {job.key(name): row for name in photos.names}
    assert engine.still_to_run(job, [0, 1, 2], photos, plan, whole) == []
    ensemble = make_plan(True, [2.0], [1, 5, 10, 20, 50], "Linf", ensemble=["apgd", "square"])
    clean = {CLEAN.key(name): {"clean_correct": correct} for name, correct in zip(photos.names, "110")}
    apgd, square = ensemble.stages_at(2)
    fooled_a = {apgd.key("a.png"): {"success": "1"}, apgd.key("b.png"): {"success": "0"}}
    assert engine.still_to_run(square, [0, 1, 2], photos, ensemble, {**clean, **fooled_a}) == [1], \
        "a later stage runs on the photos still correct after every earlier one"
    assert engine.still_to_run(square, [0, 1, 2], photos, ensemble,
                                        {**clean, **fooled_a, square.key("b.png"): row}) == []


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """Three photos: red (correct when clean; only the last attack fools it), white (labelled 0, misclassified when
    clean) and green (correct; no attack fools it). The attacks are fakes that record what they are asked."""
    folder = tmp_path / "planted"
    for name, colour in (("red.png", RED), ("white.png", WHITE), ("green.png", GREEN)):
        solid(folder / name, colour)
    (tmp_path / "labels.csv").write_text(f"image,label\nred.png,{TINY[RED]}\nwhite.png,0\ngreen.png,{TINY[GREEN]}\n")
    calls = []

    def fake_attack(model, method, images_u8, labels, **options):
        calls.append((method, list(labels)))
        fooled = [np.full_like(image, 0) if method == "mifgsm" and label == TINY[RED] else image
                  for image, label in zip(images_u8, labels)]  # black: the tiny model says 151, not red's 643
        return fooled, [1] * len(images_u8)
    monkeypatch.setattr(engine, "run_attack", fake_attack)
    return folder, ["--labels", tmp_path / "labels.csv", "--ensemble", "fgsm,pgd,mifgsm", "--epsilons", "8"], calls



def test_step8_gives_the_attacks_the_photo_indices(tiny, planted, tmp_path, monkeypatch):
    """The ids an attack draws by (Square) are the photos' indices in the folder: with one photo per batch, ids that
    counted from 0 in each batch would all be 0."""
    folder, extra, _ = planted
    fake, seen = engine.run_attack, {}

    def recording(model, method, images_u8, labels, ids=None, **options):
        seen.setdefault(method, []).extend(ids)
        return fake(model, method, images_u8, labels, **options)
    monkeypatch.setattr(engine, "run_attack", recording)
    status, err = tiny(folder, *extra, "--batch-size", "1", "--output-dir", tmp_path / "out")
    assert status == 0, err
    assert seen == {"fgsm": [0, 1], "pgd": [0, 1], "mifgsm": [0, 1]}, "green.png and red.png, photos 0 and 1"

def test_worst_case_flow_with_planted_outcomes(tiny, planted, tmp_path):
    folder, extra, calls = planted
    out = tmp_path / "out"
    status, err = tiny(folder, *extra, "--output-dir", out)
    assert status == 0, err
    both = [TINY[GREEN], TINY[RED]]  # green.png, red.png in sorted order; white.png is never attacked
    assert calls == [("fgsm", both), ("pgd", both), ("mifgsm", both)]
    accuracy = {row["attack"]: (row["images"], float(row["clean_accuracy"]), float(row["robust_accuracy"]))
                for row in read_csv(out / "robust_accuracy.csv")}
    assert accuracy == {"fgsm": ("3", pytest.approx(2 / 3), pytest.approx(2 / 3)),
                        "pgd": ("3", pytest.approx(2 / 3), pytest.approx(2 / 3)),
                        "mifgsm": ("3", pytest.approx(2 / 3), pytest.approx(1 / 3)),
                        "worst-case": ("3", pytest.approx(2 / 3), pytest.approx(1 / 3))}
    rows = read_rows(out)
    white = [row for row in rows if row["image"] == "white.png"]
    assert [(row["attack"], row["clean_correct"], row["success"]) for row in white] == [("clean", "0", "1")]
    red = {row["method"]: row["success"] for row in rows if row["image"] == "red.png" and row["attack"] == "ensemble"}
    assert red == {"fgsm": "0", "pgd": "0", "mifgsm": "1"}
    summary = (out / "summary.md").read_text()
    assert "| 8 | 66.7% | 66.7% | 66.7% | 33.3% | 33.3% |" in summary
    assert "5. **N/A**" in summary, "no gradient-free attack in this ensemble"


def test_resume_runs_only_the_pending_ensemble_stages(tiny, planted, tmp_path):
    folder, extra, calls = planted
    out = tmp_path / "out"
    assert tiny(folder, *extra, "--output-dir", out)[0] == 0
    header, *body = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text(header + "".join(line for line in body if ",mifgsm," not in line))
    calls.clear()
    assert tiny(folder, *extra, "--output-dir", out, "--resume")[0] == 0
    assert calls == [("mifgsm", [TINY[GREEN], TINY[RED]])], "only the missing last stage, on the photos it needs"
    assert float(read_csv(out / "robust_accuracy.csv")[-1]["robust_accuracy"]) == pytest.approx(1 / 3)


def test_resume_keeps_rows_only_for_the_model_and_settings_they_were_made_with(tiny, planted, tmp_path, monkeypatch):
    """--resume keeps an earlier run's rows only when they were made with the same model (a digest of its weights)
    and the settings that decide a row (seed, budgets' norm, queries, targets, EOT, early stop, precision); else one
    line names what differs, and results.csv is left as it was."""
    folder, extra, calls = planted
    out = tmp_path / "out"
    assert tiny(folder, *extra, "--output-dir", out)[0] == 0
    before = (out / "results.csv").read_bytes()
    status, err = tiny(folder, *extra, "--output-dir", out, "--resume", "--seed", "1")
    assert status == 2 and err.endswith(
        "made with seed 0, this run asks seed 1; run with the same settings or without --resume\n"), err
    other = make_tiny_model()
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    monkeypatch.setattr(step_2_pretrained, "load_model", lambda name, device, **options: other)
    status, err = tiny(folder, *extra, "--output-dir", out, "--resume")
    assert status == 2 and "made with model " in err and err.count("\n") == 1, err
    assert (out / "results.csv").read_bytes() == before, "a refused resume leaves the results as they were"
    (out / "evaluation.json").unlink()
    status, err = tiny(folder, *extra, "--output-dir", out, "--resume")
    assert status == 2 and err.endswith(
        "no record of the settings it was made with (evaluation.json); run without --resume\n"), err
    with pytest.raises(UsageError, match=r"^results.csv: no record of the settings it was made with \(none.json\); "
                                         r"run without resume$"):  # the library's words: its `resume` parameter
        files.check_same_settings(tmp_path / "none.json", {"seed": 0}, "results.csv")


def test_gradient_free_check_fails_when_it_fools_what_gradients_did_not(tiny, planted, tmp_path, monkeypatch):
    monkeypatch.setattr(ATTACKS["mifgsm"], "gradient_free", True)  # plant: the last attack plays square
    folder, extra, _ = planted
    assert tiny(folder, *extra, "--queries", "7", "--output-dir", tmp_path / "out")[0] == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "5. **FAIL**" in summary and "mifgsm fooled 1 of the 2 images the gradient attacks failed on" in summary
    assert "mifgsm 7 queries" in summary


def test_loader_workers_change_nothing_but_who_decodes(tiny, tmp_path):
    folder = tmp_path / "photos"
    for name, colour in (("a.png", RED), ("b.png", GREEN), ("c.png", WHITE)):
        solid(folder / name, colour)
    grid = ("--methods", "pgd", "--epsilons", "4", "--steps", "2", "--batch-size", "2")
    for workers in (0, 2):
        assert tiny(folder, *grid, "--workers", workers, "--output-dir", tmp_path / f"out{workers}")[0] == 0
    assert without_seconds(read_rows(tmp_path / "out0")) == without_seconds(read_rows(tmp_path / "out2"))


def test_sample_labels_name_real_classes_of_the_sample_photos():
    """make robust's labels: every row a sample photo and a valid class, each with its reason."""
    labels_file = REPO / "assets" / "sample_labels.csv"
    rows = read_csv(labels_file)
    assert {path.name for path in sample_paths()} >= {row["image"] for row in rows} and all(r["why"] for r in rows)
    labels = csv_labels(labels_file, [row["image"] for row in rows], find_class)
    assert labels.classes == [281, 967, 652]


def test_labelled_samples_are_exactly_the_photos_the_labels_name(tmp_path):
    """`sample_images.py --labelled` makes the folder `make robust` evaluates: no photo the CSV leaves out (step 8 would
    refuse an unlisted image), none it names missing."""
    result = run_tool("tools.sample_images", "--labelled", "--output-dir", "labelled", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    copied = sorted(path.name for path in (tmp_path / "labelled").iterdir())
    assert copied == sorted(row["image"] for row in read_csv(REPO / "assets" / "sample_labels.csv"))
    assert result.stdout.splitlines()[0].split(" -> ")[1] == "labelled/grace_hopper.jpg", "shown relative to the cwd"


def test_run_evaluation_is_a_library_call_that_gives_what_step_8_gives(tmp_path, tiny):
    """run_evaluation(model, photos, plan, settings, out), called as a library (no argparse), writes the same
    results as step 8's command line on the same photos and settings, the seconds column aside."""
    from utils.data import find_photos
    from utils.evaluation.engine import run_evaluation
    from utils.evaluation.plan import Job, Plan, Settings
    folder = tmp_path / "photos"
    for name, colour in (("red.png", RED), ("green.png", GREEN)):
        solid(folder / name, colour)
    status, err = tiny(folder, "--methods", "fgsm", "--epsilons", "8", "--steps", "1", "--untargeted",
                       "--output-dir", tmp_path / "cli")
    assert status == 0, err
    model = make_tiny_model()
    photos = find_photos(folder, None, find_class)
    jobs = [Job("fgsm", 8.0, 1), Job("pgd", 255.0, 1)]  # the grid and its sanity run, as step 8 plans them
    plan = Plan(["fgsm"], [], None, jobs, model.classes)
    result = run_evaluation(model, photos, plan, Settings(model="tiny", folder=str(folder), epsilons=(8.0,),
                                                          steps=(1,), memory_format="channels_last"), tmp_path / "lib")
    assert result.readable == 2 and result.reported == 4 and result.summary.is_file()
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    with open(tmp_path / "cli" / "results.csv") as cli, open(tmp_path / "lib" / "results.csv") as lib:
        assert strip(csv.DictReader(lib)) == strip(csv.DictReader(cli))
