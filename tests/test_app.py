"""The page (app.py): its function on real input and on bad input, then the real page in headless Chromium."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from utils.models import find_class, predict_images, prepare_image
from tests.conftest import GRACE_HOPPER, OFFLINE, REPO

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -r requirements.txt)")
import app  # noqa: E402

GOLDFISH = "goldfish, Carassius auratus"


def answers(upload=None, sample="grace_hopper.jpg", target="goldfish", epsilon=8, steps=20, method="pgd", defense="jpeg"):
    """The page's answer as Gradio runs it: a generator whose files last until it is asked for more."""
    return app.on_page(app.trick)(upload, sample, target, epsilon, steps, method, defense, OFFLINE)


def ask(**inputs):
    return next(answers(**inputs))


def test_the_page_tricks_the_model_and_judges_the_png_it_offers(offline_model):
    page = answers(upload=str(GRACE_HOPPER), sample=None)
    clean, verdict, comparison, png, defense_report, through, adaptive_png = next(page)
    assert next(iter(clean)) == "military uniform" and len(clean) == 5
    image = prepare_image(GRACE_HOPPER, offline_model)
    adversarial = np.asarray(Image.open(png))
    assert np.abs(adversarial.astype(int) - image.astype(int)).max() <= 8
    assert predict_images(offline_model, [prepare_image(png, offline_model)]) == [find_class("goldfish")]
    assert verdict.startswith(f"**New prediction:** {GOLDFISH}")
    assert "**After jpeg (quality 75):**" in defense_report and "**Adaptive attack**" in defense_report
    for path in (comparison, through, adaptive_png):
        assert Path(path).is_file()
    with pytest.raises(StopIteration):  # Gradio asks for more once it has copied the files into its cache...
        next(page)
    assert not Path(png).parent.exists()  # ...and the answer's folder goes
    assert list(Path(app.WORK.name).iterdir()) == []


def test_a_refused_request_leaves_no_folder():
    with pytest.raises(gr.Error):
        ask(target="goldfsh")
    assert list(Path(app.WORK.name).iterdir()) == []


def test_the_page_shows_each_attacks_progress():
    calls = []
    next(app.trick(None, "grace_hopper.jpg", "1", 8, 6, "pgd", "jpeg", OFFLINE,
                   progress=lambda fraction, desc: calls.append((fraction, desc))))
    plain = [fraction for fraction, desc in calls if desc.startswith("pgd attack: loss ")]
    adaptive = [fraction for fraction, desc in calls if desc.startswith("adaptive attack: loss ")]
    assert plain[0] == (1, 6) and adaptive[0] == (1, 6) and len(plain) + len(adaptive) == len(calls)


@pytest.mark.parametrize("inputs, message", [
    (dict(target="goldfsh"), "unknown class name 'goldfsh'; closest: 1 (goldfish, Carassius auratus)"),
    (dict(target=" "), "type a target class"),
    (dict(epsilon=300), "epsilon must be in (0, 255], got 300"),
    (dict(epsilon=None), "epsilon must be a number, got ''"),
    (dict(steps=0), "steps must be in [1, 100000], got 0"),
    (dict(steps=2.5), "steps must be an integer, got '2.5'"),
    (dict(steps=501), "steps must be at most 500 on this page, got 501"),
    (dict(sample=None), "upload a photo or pick a sample"),
    (dict(sample="cat.jpg"), "unknown sample 'cat.jpg'"),
    (dict(defense="nope"), "unknown defense 'nope'"),
])
def test_bad_input_is_one_clear_message(inputs, message):
    with pytest.raises(gr.Error) as error:
        ask(**inputs)
    assert message in error.value.message


def test_an_upload_that_is_not_an_image_is_named_by_its_file_name(tmp_path):
    upload = tmp_path / "notes.png"
    upload.write_text("not a picture")
    with pytest.raises(gr.Error) as error:
        ask(upload=str(upload))
    assert error.value.message == "notes.png: not an image file (PIL cannot identify it)"


def png_declaring(path, width, height):
    """An RGBA PNG whose header declares width x height pixels over one pixel of data: cheap to make, and costly to
    decode if anything tried."""
    Image.new("RGBA", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    header = struct.pack(">II", width, height) + data[24:29]  # then depth, colour type, ... as they were
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("width, height, message", [
    (100_000, 100_000, "big.png: refused as a possible decompression bomb"),
    (8000, 6250, "big.png: 8000 x 6250 is 50.0 megapixels; this page takes photos up to 40 megapixels"),
])
def test_an_upload_shown_as_a_picture_is_refused_before_any_pixel_is_decoded(tmp_path, monkeypatch, width, height,
                                                                               message):
    from gradio.data_classes import ImageData

    def decoded(image):
        raise AssertionError(f"{image.size} decoded")

    upload = png_declaring(tmp_path / "big.png", width, height)
    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)  # what every decode of a file goes through
    path = app.photo_input().preprocess(ImageData(path=str(upload), orig_name="big.png"))  # as the page's input
    assert path == str(upload)
    with pytest.raises(gr.Error) as error:
        ask(upload=path)
    assert error.value.message.startswith(message)


def test_the_picture_input_takes_only_an_uploaded_file():
    from gradio.data_classes import ImageData

    inline = ImageData(url="data:image/png;base64,iVBORw0KGgo=")
    with pytest.raises(gr.Error, match="send the photo as an uploaded file"):
        app.uploaded_path(inline)
    assert app.uploaded_path(None) is None


# ---- the page in a real browser -------------------------------------------------------------------------------

def browser():
    """Headless Chromium driven by Debian's chromedriver, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -r requirements.txt)")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(process, port, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with status {process.returncode}: {process.stdout.read()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"the app did not listen on port {port} within {seconds} s")


@pytest.fixture
def page_url():
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_server(process, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def shown_photo_size(driver, wait):
    """(width, height) of the picture the upload box shows, once the browser has drawn it."""
    from selenium.webdriver.common.by import By

    def drawn(driver):
        pictures = driver.find_elements(By.CSS_SELECTOR, "#photo img")
        sizes = [driver.execute_script("return arguments[0].complete && [arguments[0].naturalWidth, "
                                       "arguments[0].naturalHeight]", picture) for picture in pictures]
        return next((tuple(size) for size in sizes if size and size[0] > 0), False)
    return wait.until(drawn)


@pytest.mark.browser
def test_a_person_uploads_a_photo_and_gets_goldfish_in_chromium(page_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(page_url)
        wait = WebDriverWait(driver, 60)
        wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, "#photo input[type=file]")))
        driver.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(GRACE_HOPPER))
        assert shown_photo_size(driver, wait) == Image.open(GRACE_HOPPER).size  # the photo itself, not a file chip
        target = driver.find_element(By.CSS_SELECTOR, "#target input")
        target.send_keys(Keys.CONTROL, "a")
        target.send_keys("goldfish", Keys.ENTER)
        driver.find_element(By.ID, "trick").click()
        WebDriverWait(driver, 300).until(seen.text_to_be_present_in_element((By.ID, "verdict"), "New prediction: goldfish"))
        wait.until(seen.text_to_be_present_in_element((By.ID, "defense-report"), "Adaptive attack"))
        assert "military uniform" in driver.find_element(By.ID, "clean").text
        screenshot = Path(os.environ.get("TNN_APP_SCREENSHOT", tmp_path / "app.png"))
        driver.save_screenshot(str(screenshot))
        assert Image.open(screenshot).size[0] > 0

        target.send_keys(Keys.CONTROL, "a")
        target.send_keys("goldfsh", Keys.TAB)  # a typo: the page should say so, and suggest the class
        driver.find_element(By.ID, "trick").click()
        wait.until(seen.text_to_be_present_in_element((By.TAG_NAME, "body"), "unknown class name 'goldfsh'; closest: 1"))
        assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
    except Exception:
        driver.save_screenshot(str(tmp_path / "failed.png"))
        raise
    finally:
        driver.quit()
