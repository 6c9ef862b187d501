"""pacs-ai's results in the OHIF viewer 3.13.2, as a radiologist opens them.

The ``@ohif/app`` 3.13.2 production build (``npm pack`` from the npm registry
into the gitignored ``.cache/npm``) is served by :class:`~tests.e2e.ohif.ViewerServer`
with our own ``app-config.js`` and a same-origin proxy to Orthanc's DICOMweb
plugin; headless Chromium (selenium) opens the study, the SEG (answering the
"open this Segmentation?" prompt), the measurement SR, tracks it (OHIF hydrates
the detected nodules into its measurements panel, one row each, and a click on
a row shows the nodule's slice), goes through the SR's groups to a nodule's
values, and opens the draft report.
Chromium resolves no host but loopback, so nothing can come from a CDN.
Screenshots of every step are kept in ``.cache/ohif-screenshots/`` (gitignored).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from pacs_ai.analyze.base import Code, DetectionSpec
from pacs_ai.encode import EquipmentInfo
from pacs_ai.encode.report_sr import DraftingModel, ReportText, build_draft_sr, draft_sr_uids
from pacs_ai.encode.results import build_results
from tests.e2e.ohif import OHIF_PACKAGE, REPO, ViewerServer, npm_package
from tests.integration.synthetic_ct import lung_labels, lung_result, make_ct_series, volume_from_headers
from tests.peers import OrthancServer, orthanc_dicomweb_config

SCREENSHOTS = REPO / ".cache" / "ohif-screenshots"
NODULE = Code("27925004", "SCT", "Nodule")
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
LEFT_LUNG = Code("44029006", "SCT", "Left lung")
TIMEOUT = 40.0
PANE = '[data-cy="viewport-pane"]'


def _part10(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ohif_dist() -> Path:
    try:
        return npm_package(OHIF_PACKAGE) / "dist"
    except RuntimeError as exc:
        pytest.fail(f"cannot get {OHIF_PACKAGE} from the npm registry: {exc}")


def _wait(what: str, condition: Callable[[], object], timeout: float = TIMEOUT) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"OHIF: timed out waiting for {what}")
        time.sleep(0.25)


class Viewer:
    """The few OHIF interactions the test needs, with a screenshot after each step."""

    def __init__(self, driver: webdriver.Chrome, shots: Path) -> None:
        self.driver = driver
        self.shots = shots
        self.console: list[dict[str, object]] = []

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))
        self.console += self.driver.get_log("browser")

    def wait(self, what: str, condition: Callable[[], object]) -> None:
        """Wait for ``condition``; on a timeout keep a screenshot named after ``what``."""
        try:
            _wait(what, condition)
        except AssertionError:
            self.shot("failed " + what.replace(" ", "-"))
            raise

    def open_until(self, description: str, what: str, condition: Callable[[], object]) -> None:
        """Open a series and wait for ``condition``; double-click again if the first one was lost.

        A double-click that lands while OHIF re-renders the study browser (after a
        segmentation is loaded, say) is dropped without a trace.
        """
        for _ in range(2):
            self.open(description)
            try:
                _wait(what, condition, timeout=TIMEOUT / 2)
                return
            except AssertionError:
                pass
        self.open(description)
        self.wait(what, condition)

    def text(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "body").get_attribute("innerHTML") or ""

    def thumbnail(self, description: str) -> WebElement:
        def find() -> WebElement | None:
            for element in self.driver.find_elements(By.CSS_SELECTOR, '[data-cy^="study-browser-thumbnail"]'):
                if description in element.text:
                    return element
            return None

        return _wait(f"the thumbnail of {description!r}", find)  # type: ignore[return-value]

    def open(self, description: str) -> None:
        """Double-click a series thumbnail (again if React re-rendered it meanwhile)."""
        for _ in range(5):
            try:
                ActionChains(self.driver).double_click(self.thumbnail(description)).perform()
                return
            except StaleElementReferenceException:
                time.sleep(0.5)
        raise AssertionError(f"OHIF: the thumbnail of {description!r} kept changing")

    def click(self, label: str) -> None:
        """Click the visible button labelled ``label`` once it appears."""

        def clicked() -> bool:
            try:
                for element in self.driver.find_elements(By.TAG_NAME, "button"):
                    if element.is_displayed() and element.text.strip() == label:
                        element.click()
                        return True
            except StaleElementReferenceException:
                pass
            return False

        _wait(f"a {label!r} button", clicked)

    def pane(self, index: int) -> None:
        """Make viewport ``index`` the active one (the next series opens there)."""
        _wait(f"viewport {index}", lambda: len(self.driver.find_elements(By.CSS_SELECTOR, PANE)) > index)
        self.driver.find_elements(By.CSS_SELECTOR, PANE)[index].click()
        time.sleep(0.5)

    def panel(self, data_cy: str) -> None:
        self.driver.find_element(By.CSS_SELECTOR, f'[data-cy="{data_cy}"]').click()

    def click_data_cy(self, data_cy: str) -> None:
        """Click the element ``data-cy`` names once it is shown (a prompt's button, say)."""

        def clicked() -> bool:
            try:
                for element in self.driver.find_elements(By.CSS_SELECTOR, f'[data-cy="{data_cy}"]'):
                    if element.is_displayed():
                        element.click()
                        return True
            except StaleElementReferenceException:
                pass
            return False

        self.wait(f"the {data_cy!r} element", clicked)

    def visible(self, data_cy: str) -> bool:
        return any(
            e.is_displayed() for e in self.driver.find_elements(By.CSS_SELECTOR, f'[data-cy="{data_cy}"]')
        )

    def overlay(self, pane: int, corner: str) -> str:
        """The text of viewport ``pane``'s overlay corner (``bottom-right`` shows "I:13 (13/24)")."""
        try:
            element = self.driver.find_elements(By.CSS_SELECTOR, PANE)[pane].find_element(
                By.CSS_SELECTOR, f'[data-cy="viewport-overlay-{corner}"]'
            )
            return str(element.text)
        except (IndexError, StaleElementReferenceException, NoSuchElementException):
            return ""

    def assert_no_error(self, step: str) -> None:
        page = self.text()
        for sign in ("Something went wrong", "Error boundary", 'data-type="error"'):
            assert sign not in page, f"OHIF shows an error after {step}: {sign!r}"
        self.console += self.driver.get_log("browser")
        about_results = [
            entry["message"]
            for entry in self.console
            if entry["level"] == "SEVERE"
            and any(
                word in str(entry["message"]) for word in ("SEG", "SR", "egmentation", "TypeError", "eport")
            )
        ]
        assert not about_results, f"console errors after {step}: {about_results}"


def _nearest_slice(headers: list[Dataset], z: float) -> Dataset:
    """The axial source image whose plane is nearest ``z`` (where the SR draws a box centred there)."""
    return min(headers, key=lambda header: abs(float(header.ImagePositionPatient[2]) - z))


def test_ohif_shows_seg_measurements_and_draft(
    ohif_dist: Path, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    series = make_ct_series(n_slices=24, rows=128, columns=128)
    headers = [pydicom.dcmread(DicomBytesIO(_part10(ds)), stop_before_pixels=True) for ds in series]
    volume = volume_from_headers(headers)
    result = lung_result(volume, lung_labels(volume.voxels.shape))
    middle = volume.headers[len(volume.headers) // 2]
    z = float(middle.ImagePositionPatient[2])
    z_low = float(volume.headers[6].ImagePositionPatient[2])
    result.detections = [  # a nodule in each lung, on slices of their own
        DetectionSpec(
            NODULE, 0.87, (-30.0, -10.0, z - 3), (-18.0, 2.0, z + 3), RIGHT_LUNG, 0.5, "right lung"
        ),
        DetectionSpec(
            NODULE, 0.64, (12.0, 0.0, z_low - 2), (20.0, 8.0, z_low + 2), LEFT_LUNG, 0.5, "left lung"
        ),
    ]
    equipment = EquipmentInfo()
    (_, seg), (_, sr) = build_results(volume, result, key="ohif-test", equipment=equipment)
    draft_series, draft_instance = draft_sr_uids("ohif-test", 1)
    draft = build_draft_sr(
        evidence=[*volume.headers, seg, sr],
        text=ReportText("Both lungs are aerated.", "No acute cardiopulmonary finding."),
        drafter=DraftingModel("template", "lung-v1"),
        equipment=equipment,
        series_instance_uid=draft_series,
        sop_instance_uid=draft_instance,
    )
    right_volume = next(
        m.value for m in result.measurements if m.segment_number == 1 and m.name.value == "118565006"
    )

    shots = SCREENSHOTS / "test_ohif_shows_seg_measurements_and_draft"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    with OrthancServer(extra_config=orthanc_dicomweb_config()) as orthanc:
        for ds in (*series, seg, sr, draft):
            requests.post(f"{orthanc.url}/instances", data=_part10(ds), timeout=30).raise_for_status()
        with ViewerServer(ohif_dist, orthanc.host, orthanc.http_port) as server:
            viewer = Viewer(browser, shots)
            browser.get(f"{server.origin}/viewer?StudyInstanceUIDs={series[0].StudyInstanceUID}")
            viewer.thumbnail("AI lung segmentation")
            time.sleep(1)
            for skip in browser.find_elements(By.XPATH, '//*[text()="Skip all"]'):  # the first-use tour
                skip.click()
            viewer.shot("1-study")
            viewer.assert_no_error("opening the study")

            viewer.open("AI lung segmentation")
            viewer.click("Yes")  # "Do you want to open this Segmentation?"
            viewer.panel("panelSegmentation-btn")
            viewer.wait(
                "both segment labels", lambda: "Right lung" in viewer.text() and "Left lung" in viewer.text()
            )
            viewer.shot("2-segmentation")
            viewer.assert_no_error("opening the SEG")

            # Two viewports, one above the other: the CT with its SEG stays in the first, the
            # SR opens in the second, as a radiologist compares them.
            browser.find_element(By.CSS_SELECTOR, '[data-cy="Layout"]').click()
            browser.find_element(By.CSS_SELECTOR, '[data-cy="Layout-0-1"]').click()
            viewer.pane(1)
            viewer.open_until(
                "AI lung measurements",
                "the right lung volume",
                lambda: f"{right_volume:.2f} mL" in viewer.text(),
            )
            viewer.shot("3-measurements")
            viewer.assert_no_error("opening the measurement SR")
            assert "Attenuation Coefficient" in viewer.text()
            # Track the SR's measurements: OHIF asks as the SR opens ("continue tracking measurements
            # for this study?"; a click elsewhere dismisses the question for good), hydrates the
            # nodules (their Image Regions) into its measurements panel, one row per nodule, and a
            # click on a row shows the nodule's slice.
            viewer.wait("OHIF's tracking prompt", lambda: viewer.visible("yes-hydrate-btn"))
            viewer.click_data_cy("yes-hydrate-btn")
            viewer.panel("trackedMeasurements-btn")
            rows = '[data-cy="trackedMeasurements-panel"] [data-cy="data-row"]'
            viewer.wait("a row per nodule", lambda: len(browser.find_elements(By.CSS_SELECTOR, rows)) == 2)
            viewer.shot("3b-measurements-panel")
            panel = browser.find_element(By.CSS_SELECTOR, '[data-cy="trackedMeasurements-panel"]').text
            for detection in result.detections:
                assert detection.finding_site is not None
                assert detection.finding_site.meaning in panel, panel
            for index, detection in enumerate(result.detections):
                browser.find_elements(By.CSS_SELECTOR, rows)[index].find_element(
                    By.CSS_SELECTOR, '[data-cy="data-row-title"]'
                ).click()
                instance = int(_nearest_slice(volume.headers, detection.center_mm[2]).InstanceNumber)
                viewer.wait(
                    f"the slice of nodule {index + 1}",
                    lambda n=instance: f"I:{n} (" in viewer.overlay(1, "bottom-right"),
                )
                viewer.shot(f"3c-nodule-{index + 1}")
                assert detection.finding.meaning in browser.find_elements(By.CSS_SELECTOR, rows)[index].text
            viewer.assert_no_error("tracking the nodules")

            # The SR itself again, in the same viewport: its arrows go from one measurement group to
            # the next, to the nodule with its values.
            viewer.open_until(
                "AI lung measurements",
                "the SR again",
                lambda: f"{right_volume:.2f} mL" in viewer.text(),
            )
            for _ in range(4):
                if "Width: 12.00 mm" in viewer.text():
                    break
                sr_pane = browser.find_elements(By.CSS_SELECTOR, PANE)[1]
                sr_pane.find_element(By.CSS_SELECTOR, '[data-cy="viewport-action-arrows-right"]').click()
                time.sleep(1)
            viewer.wait("the nodule", lambda: "Width: 12.00 mm" in viewer.text())
            assert "Certainty of Finding: 0.87" in viewer.text()
            viewer.shot("3f-sr-nodule")

            viewer.pane(0)  # the CT with its SEG, still loaded
            viewer.panel("panelSegmentation-btn")
            viewer.wait(
                "the segment labels after the SR",
                lambda: "Right lung" in viewer.text() and "Left lung" in viewer.text(),
            )
            viewer.shot("4-segmentation-after-sr")
            viewer.assert_no_error("going back to the images")

            viewer.pane(1)
            viewer.open_until(
                "AI draft report", "the draft's status", lambda: "AI draft, not verified" in viewer.text()
            )
            viewer.shot("5-draft")
            viewer.assert_no_error("opening the draft")
            assert "No acute cardiopulmonary finding." in viewer.text()
            # The observer context as labelled fields, not one run-on line of values.
            assert "Device Observer Name" in viewer.text() and "Observer Type" in viewer.text()
            dicomweb_errors = [(path, status) for path, status in server.requests if status >= 400]
            assert not dicomweb_errors, dicomweb_errors
