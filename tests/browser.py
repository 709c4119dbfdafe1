"""The web demo (app.py) on a loopback port, driven by headless Chromium through Selenium: the
Debian chromium and chromedriver packages, named explicitly so Selenium Manager never downloads
a browser or a driver.

    python tests/browser.py CKPT OUT.png [--vae-path DIR] [--class-label 3]   # a screenshot after one generate
"""
import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from launch import REPO_ROOT, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_CHROMIUM = "apt-get install -y chromium chromium-driver"
WINDOW = (1400, 1100)
START_TIMEOUT = 180  # torch and gradio imports on a busy machine
WAIT_TIMEOUT = 60


def missing_browser():
    """None when Chromium and its driver are installed, else what to run to install them."""
    if all(os.access(path, os.X_OK) for path in (CHROMIUM, CHROMEDRIVER)):
        return None
    return (f"Chromium or chromedriver not found at {CHROMIUM}, {CHROMEDRIVER}: "
            f"install them with `{INSTALL_CHROMIUM}`")


#################################################################################
#                                    The app                                    #
#################################################################################

def start_app(*args, log_path):
    """app.py with `args` on a free loopback port; returns (process, url) once it serves."""
    port = free_port()
    log = open(log_path, "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "app.py"), *args, "--port", str(port)],
                               cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}: {read(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"app.py did not serve {url} within {START_TIMEOUT} s: {read(log_path)}")


def stop_app(process):
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def read(path):
    with open(path) as f:
        return f.read()


#################################################################################
#                                  The browser                                  #
#################################################################################

def chromium():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # for requested_urls
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait(driver, condition, timeout=WAIT_TIMEOUT):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def open_page(driver, url):
    driver.get(url)
    wait(driver, expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#generate")))


def field(driver, elem_id):
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")


def type_into(driver, elem_id, text):
    """Replaces the text of a field and commits it, as a user does."""
    box = field(driver, elem_id)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(text), Keys.TAB)


def choose_option(driver, elem_id, text):
    """Opens a dropdown and clicks its option `text`."""
    field(driver, elem_id).click()
    option = wait(driver, expected_conditions.element_to_be_clickable(
        (By.CSS_SELECTOR, f"ul[role='listbox'] li[role='option'][aria-label='{text}']")))
    option.click()


def page_text(driver):
    return driver.find_element(By.TAG_NAME, "body").text


def wait_for_text(driver, text):
    wait(driver, lambda d: text in page_text(d))


def press_generate(driver):
    """Presses Generate and waits for a new image; returns its URL."""
    previous = image_url(driver)
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    return wait(driver, lambda d: (image_url(d) or None) if image_url(d) != previous else None)


def image_url(driver):
    images = driver.find_elements(By.CSS_SELECTOR, "#comparison img")
    return images[0].get_attribute("src") if images else None


def natural_size(driver):
    """(height, width) of the shown image as the browser decoded it."""
    return tuple(driver.execute_script(
        "const img = document.querySelector('#comparison img');"
        "return img.complete && img.naturalWidth ? [img.naturalHeight, img.naturalWidth] : null;") or ())


def requested_urls(driver):
    """Every URL the page asked for since the last call, from Chromium's network log."""
    events = (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    return [event["params"]["request"]["url"] for event in events
            if event["method"] == "Network.requestWillBeSent"]


def fetch(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def screenshot(driver, path):
    """The whole page, however tall."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WINDOW[0], max(WINDOW[1], height))
    driver.save_screenshot(path)


#################################################################################
#                           A screenshot for the README                         #
#################################################################################

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[2].strip())
    parser.add_argument("ckpt")
    parser.add_argument("output")
    parser.add_argument("--vae-path", default=None)
    parser.add_argument("--class-label", default="3")
    parser.add_argument("--num-images", default="8")
    args = parser.parse_args(argv)
    if missing_browser():
        raise SystemExit(f"error: {missing_browser()}")
    app_args = ["--ckpt", args.ckpt] + (["--vae-path", args.vae_path] if args.vae_path else [])
    process, url = start_app(*app_args, log_path=args.output + ".log")
    driver = chromium()
    try:
        open_page(driver, url)
        choose_option(driver, "class", args.class_label)
        type_into(driver, "num-images", args.num_images)
        press_generate(driver)
        wait(driver, lambda d: natural_size(d))
        screenshot(driver, args.output)
    finally:
        driver.quit()
        stop_app(process)
    os.remove(args.output + ".log")


if __name__ == "__main__":
    main()
