"""The page under several users at once, driven by Gradio's own client against 127.0.0.1: four requests at a time
each get their own answer, one past the queue's bound is told the page is busy, the page's temporary folder holds only
the live requests' files, and uploads too large or not images get a message while the next request still works."""
import os
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from utils.models import find_class, get_label, predict_images, prepare_image
from tests.conftest import GRACE_HOPPER, REPO
from tests.test_app import free_port, wait_for_server
from utils.samples import sample_paths

pytestmark = pytest.mark.slow  # end to end, several processes: make test-fast leaves it out

gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed (it comes with gradio)")

WORKERS, QUEUE = 2, 2  # two attacks at a time and two waiting: four requests fill the page, a fifth is refused
SECONDS = 240  # no request may take longer, so none can wait forever
# Each photo asks for a different class; epsilon 1 and 25 steps keep every attack running long enough that the
# fifth request arrives while the first four are still in the queue.
ASKS = [("grace_hopper.jpg", "goldfish"), ("astronaut.png", "tench"), ("chelsea.png", "jellyfish"),
        ("coffee.png", "toucan")]
STEPS, EPSILON = 25, 1


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page as a subprocess on a free port, its temporary files (its own and Gradio's) under one folder."""
    temp = tmp_path_factory.mktemp("page")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(temp), GRADIO_TEMP_DIR=str(temp / "gradio"))
    process = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), "--workers", str(WORKERS),
                                "--max-queue", str(QUEUE)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_server(process, port)
        yield f"http://127.0.0.1:{port}", process, temp
    finally:
        process.terminate()
        process.wait(timeout=30)


def answer_folders(temp):
    """The answers' folders inside the page's own temporary folder (tempfile's tnn-app-*)."""
    [work] = temp.glob("tnn-app-*")
    return list(work.iterdir())


def submit(url, upload=None, sample=None, target="goldfish", epsilon=EPSILON, steps=STEPS):
    """One user: a client of its own, and the job of one request to the page's only endpoint."""
    client = gradio_client.Client(url, verbose=False)
    photo = gradio_client.handle_file(str(upload)) if upload else None
    return client.submit(photo, sample, target, epsilon, steps, "pgd", "jpeg", api_name="/trick")


def queued(job):
    """Has the server taken this request, into its queue or to a worker?"""
    return job.status().code not in (gradio_client.utils.Status.STARTING, gradio_client.utils.Status.JOINING_QUEUE)


def wait_until(condition, seconds=SECONDS):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the page did not get there in time"
        time.sleep(0.05)


def check_own_answer(outputs, sample, target, model):
    """The answer is for this photo and this target: its clean top class is the photo's, its verdict names the
    target, and its new prediction is that of the PNG it offers, read back here."""
    clean, verdict, _, png, _, _, _ = outputs
    photo = next(path for path in sample_paths() if path.name == sample)
    assert clean["label"] == get_label(predict_images(model, [prepare_image(photo, model)])[0]), (sample, clean)
    assert f"target {get_label(find_class(target))}" in verdict, (sample, verdict)
    new = get_label(predict_images(model, [prepare_image(png, model)])[0])
    assert verdict.startswith(f"**New prediction:** {new}"), (sample, verdict, new)


def test_four_users_at_once_each_get_their_own_answer_and_a_fifth_is_told_it_is_busy(page, offline_model):
    url, process, temp = page
    with ThreadPoolExecutor(len(ASKS)) as users:
        jobs = list(users.map(lambda ask: submit(url, sample=ask[0], target=ask[1]), ASKS))
    wait_until(lambda: all(queued(job) for job in jobs))
    assert not any(job.done() for job in jobs), "an attack ended before the queue could be seen full: make it longer"
    with pytest.raises(gradio_client.utils.QueueError, match="Queue is full"):  # the page says it is busy
        submit(url, sample="rocket.jpg").result(timeout=SECONDS)
    folders = []
    while not all(job.done() for job in jobs):  # meanwhile, the page keeps only what live requests need
        folders.append(len(answer_folders(temp)))
        time.sleep(0.05)
    for job, (sample, target) in zip(jobs, ASKS):
        check_own_answer(job.result(timeout=SECONDS), sample, target, offline_model)
    assert 1 <= max(folders) <= WORKERS, folders
    assert answer_folders(temp) == [], "an answered request's folder was left behind"
    assert process.poll() is None


def bomb(path):
    """A PNG whose header declares 100000 x 100000 pixels (10 gigapixels) over one pixel of data."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    header = struct.pack(">II", 100_000, 100_000) + data[24:29]  # width, height, then depth, colour, ... as they were
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    path.write_bytes(bytes(data))
    return path


def fifty_megapixels(path):
    Image.new("RGB", (8000, 6250), "white").save(path)
    return path


def text(path):
    path.write_text("not a picture")
    return path


@pytest.mark.parametrize("name, make, message", [
    ("bomb.png", bomb, "bomb.png: refused as a possible decompression bomb"),
    ("huge.png", fifty_megapixels, "huge.png: 8000 x 6250 is 50.0 megapixels; this page takes photos up to 40 megapixels"),
    ("notes.png", text, "notes.png: not an image file (PIL cannot identify it)"),
])
def test_a_bad_upload_gets_a_message_and_the_next_request_still_works(page, tmp_path, name, make, message):
    url, process, temp = page
    upload = make(tmp_path / name)
    with pytest.raises(gradio_client.exceptions.AppError) as error:
        submit(url, upload=upload, steps=1).result(timeout=SECONDS)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert process.poll() is None
    clean, verdict, *_ = submit(url, upload=GRACE_HOPPER, steps=1).result(timeout=SECONDS)
    assert clean["label"] == "military uniform" and verdict.startswith("**New prediction:** ")
    assert answer_folders(temp) == []
