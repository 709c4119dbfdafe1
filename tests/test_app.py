"""The web demo in a real browser: app.py serves a tiny EDT (random weights) and a tiny VAE on a
loopback port, headless Chromium chooses a class and presses Generate, and the image shown is
the samples with AMM and without from the same noise, as the sampling functions give them in
this process; bad input shows its message in the page and the app keeps serving."""
import io

import numpy as np
import pytest
from PIL import Image

import app as app_script
import browser
from browser import (chromium, choose_option, fetch, missing_browser, natural_size, open_page,
                     press_generate, requested_urls, screenshot, start_app, stop_app, type_into, wait,
                     wait_for_text)
from demo.generation import DISPLAY_SIDE, CheckpointCache, DemoInputError, Request, generate, whole_number
from sampling.comparison import comparison_image, sample_with_and_without_amm
from sampling.images import GRID_PADDING
from sampling.loading import load_sampling_model
from sampling.sampler import Sampler, guided_model_fn
from test_sampling import AMM_BLOCKS, IMAGE_SIZE, NUM_CLASSES, save_ours, tiny_edt_kwargs
from tiny_vae import save_tiny_vae

CLASS = 7
NUM_IMAGES = 3  # one grid row of 3
STEPS = 4
SEED = 5
CFG = 4.0  # the page's default
MAX_IMAGES = 6
ZOOM = DISPLAY_SIDE // IMAGE_SIZE


@pytest.fixture(scope="module")
def driver():
    missing = missing_browser()
    if missing:
        pytest.fail(missing)  # the browser test is the feature's test: never skipped
    driver = chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    vae = save_tiny_vae(str(root / "sd-vae-ft-ema"))
    ckpt = str(root / "0000100.pt")
    save_ours(ckpt, tiny_edt_kwargs(), "ema", IMAGE_SIZE)
    process, url = start_app("--ckpt", ckpt, "--vae-path", vae, "--max-images", str(MAX_IMAGES),
                             log_path=str(root / "app.log"))
    yield {"url": url, "ckpt": ckpt, "vae": vae, "root": root}
    stop_app(process)


def expected_comparison(app):
    """The page's image, computed here with the sampling functions the app shares."""
    loaded = load_sampling_model(app["ckpt"], vae_path=app["vae"])
    sample = Sampler("ddpm", STEPS).sample_fn(guided_model_fn(loaded.model, CFG), loaded.latent_shape, "cpu")
    with_amm, without_amm = sample_with_and_without_amm(sample, loaded, AMM_BLOCKS, SEED, [CLASS] * NUM_IMAGES,
                                                        batch_size=16)
    return comparison_image(with_amm, without_amm, NUM_IMAGES, ZOOM)


def comparison_halves(image):
    """(with AMM, without AMM) grids of a comparison image, at the zoomed size."""
    grid_width = (NUM_IMAGES * (IMAGE_SIZE + GRID_PADDING) + GRID_PADDING) * ZOOM
    return image[:, :grid_width], image[:, -grid_width:]


def test_generate_shows_samples_with_and_without_amm(app, driver, one_torch_thread):  # one thread, as the app
    open_page(driver, app["url"])
    choose_option(driver, "class", str(CLASS))
    type_into(driver, "steps", STEPS)
    type_into(driver, "seed", SEED)
    type_into(driver, "num-images", NUM_IMAGES)
    url = press_generate(driver)
    shown = np.asarray(Image.open(io.BytesIO(fetch(url))).convert("RGB"))

    grid_side = IMAGE_SIZE + GRID_PADDING
    height = (grid_side + GRID_PADDING) * ZOOM
    width = (2 * (NUM_IMAGES * grid_side + GRID_PADDING) + 4 * GRID_PADDING) * ZOOM
    assert shown.shape == (height, width, 3)
    assert wait(driver, lambda d: natural_size(d)) == (height, width)
    with_amm, without_amm = comparison_halves(shown)
    assert not np.array_equal(with_amm, without_amm)  # the AMM changes the samples
    expected = expected_comparison(app)
    assert np.array_equal(shown, expected)
    wait_for_text(driver, f"class {CLASS}, {NUM_IMAGES} per side")
    offline = ("data:", "blob:", app["url"])  # the app's own server, nothing else: no fonts, no analytics
    requested = requested_urls(driver)
    assert any(url.startswith(app["url"]) for url in requested)
    assert [url for url in requested if not url.startswith(offline)] == []
    path = app["root"] / "app_screenshot.png"
    screenshot(driver, str(path))
    assert Image.open(path).size[0] > 0


@pytest.mark.parametrize("elem_id, value, message", [
    ("num-images", MAX_IMAGES + 1, f"between 1 and {MAX_IMAGES}"),
    ("class", NUM_CLASSES, f"class {NUM_CLASSES} is out of range"),
    ("ckpt", "missing.pt", "no checkpoint at 'missing.pt'"),
])
def test_bad_input_shows_a_message_and_the_app_keeps_serving(app, driver, elem_id, value, message):
    open_page(driver, app["url"])
    type_into(driver, "steps", 2)
    type_into(driver, "num-images", 1)
    type_into(driver, elem_id, value)
    driver.find_element("css selector", "#generate").click()
    wait_for_text(driver, message)
    open_page(driver, app["url"])
    type_into(driver, "steps", 2)
    type_into(driver, "num-images", 1)
    press_generate(driver)
    wait_for_text(driver, "class 0, 1 per side")


def test_missing_browser_is_reported_with_the_install_command(monkeypatch):
    monkeypatch.setattr(browser, "CHROMIUM", "/nonexistent/chromium")
    assert "apt-get install -y chromium chromium-driver" in browser.missing_browser()


def test_progress_is_reported_after_every_forward(app):
    cache = CheckpointCache(app["vae"])
    reports = []
    request = Request(app["ckpt"], "2", 1.0, "ddim", num_steps=3, seed=0, num_images=3, amm_blocks=[1])
    _, summary = generate(cache, request, max_images=3, batch_size=2, report=lambda *done: reports.append(done))
    total = 2 * 2 * 3  # AMM on and off, 2 batches, 3 steps
    assert reports == [(done, total) for done in range(1, total + 1)]
    assert "class 2, 3 per side" in summary and "ddim 3 steps" in summary


def test_command_line_says_how_to_make_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no quickstart_output here
    with pytest.raises(SystemExit, match="no --ckpt and no quickstart checkpoint.*python quickstart.py"):
        app_script.parse_args([])
    with pytest.raises(SystemExit, match="no checkpoint at 'missing.pt'"):
        app_script.main(["--ckpt", "missing.pt"])
    checkpoints = tmp_path / "quickstart_output" / "results" / "000-EDT" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in ("0000500.pt", "0001000.pt"):
        (checkpoints / step).touch()
    assert app_script.parse_args([]).ckpt == str(checkpoints.relative_to(tmp_path) / "0001000.pt")


def test_an_empty_number_field_is_a_message():
    assert whole_number(3.0, "seed") == 3
    with pytest.raises(DemoInputError, match="seed is empty"):
        whole_number(None, "seed")
