"""The Gradio Space: importable without launching, served on 127.0.0.1 and driven through gradio_client (results equal
direct model calls) and through a real headless Chromium (upload, bars, screenshot, errors that keep the app up)."""

from __future__ import annotations

import os


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from helpers import save_tiny_model
from test_publish import save_tiny_llava

from chexficient.inference.synthetic import write_dicom
from space import app as space_app
from space import screenshot

from image_processing_chexficient import CheXficientImageProcessor
from modeling_chexficient import CHEXPERT_LABELS, CheXficientModel, zero_shot_prompts
from processing_chexficient import CheXficientProcessor


FINDINGS = "Cardiomegaly, Pleural Effusion\nPneumothorax, No Finding, cardiomegaly"
ARTIFACTS = Path(
    os.environ.get("CHEXFICIENT_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "outputs" / "test-artifacts")
)


def phantom_png(path: Path, seed: int = 0) -> Path:
    """A small grayscale radiograph-like image (bright body, dark lungs)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:48, 0:40]
    body = ((x - 20) / 18) ** 2 + ((y - 24) / 22) ** 2 < 1
    lungs = (((x - 12) / 6) ** 2 + ((y - 22) / 12) ** 2 < 1) | (((x - 28) / 6) ** 2 + ((y - 22) / 12) ** 2 < 1)
    image = 40 + 150 * body - 100 * lungs + rng.normal(0, 8, body.shape)
    PIL.Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on a free 127.0.0.1 port with a tiny CheXficient and a tiny LLaVA-Rad; yields (url, folders, files)."""
    root = tmp_path_factory.mktemp("space")
    model_dir, llava_dir = root / "chexficient", root / "llava"
    save_tiny_model(model_dir)
    save_tiny_llava(llava_dir)
    files = {"png": phantom_png(root / "chest.png")}
    files["dicom"] = write_dicom(
        root / "study.dcm", (np.asarray(PIL.Image.open(files["png"])) * 200).astype(np.uint16)
    )
    files["corrupt_dicom"] = root / "broken.dcm"
    files["corrupt_dicom"].write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    files["text_as_png"] = root / "notes.png"
    files["text_as_png"].write_bytes(b"FINDINGS: this is a report, not an image.\n")
    files["text"] = root / "report.txt"
    files["text"].write_text("Heart size is normal.")
    files["dicom_no_suffix"] = root / "IM000001"
    files["dicom_no_suffix"].write_bytes(files["dicom"].read_bytes())
    demo = space_app.build_demo(model_dir, llava_dir)
    space_app.launch(
        demo, server_name="127.0.0.1", server_port=screenshot.free_port(), prevent_thread_lock=True, quiet=True
    )
    try:
        yield demo.local_url, model_dir, llava_dir, files
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[0], verbose=False)


def direct_probabilities(model_dir: Path, image: Path, findings: list[str]) -> dict[str, float]:
    """p(finding) computed by hand, without the app: the processor, the paper's prompt pair, softmax over cosines."""
    model = CheXficientModel.from_pretrained(model_dir).eval()
    processor = CheXficientProcessor.from_pretrained(model_dir)
    probabilities = {}
    with torch.no_grad():
        image_embeds = model.get_image_features(processor(images=[image])["pixel_values"])[0]
        for finding in findings:
            ((positive, negative),) = zero_shot_prompts(finding)
            tokens = processor(text=[positive, negative])
            text = model.get_text_features(tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"])
            probabilities[finding] = float((text @ image_embeds).softmax(dim=0)[0])
    return probabilities


def test_app_is_importable_and_configured_by_environment(served, tmp_path, monkeypatch):
    import gradio as gr

    assert space_app.CheXficientSpace(served[1]).default_findings == CHEXPERT_LABELS  # from the folder's own code
    assert space_app.parse_findings(FINDINGS) == ["Cardiomegaly", "Pleural Effusion", "Pneumothorax", "No Finding"]
    for bad, reason in (
        ("", "at least one finding"),
        (", ,\n", "at least one finding"),
        (",".join(map(str, range(41))), "At most 40"),
    ):
        with pytest.raises(space_app.UploadError, match=reason):
            space_app.parse_findings(bad)
    save_tiny_model(tmp_path / "model")
    monkeypatch.setenv("CHEXFICIENT_MODEL", str(tmp_path / "model"))
    monkeypatch.delenv("CHEXFICIENT_LLAVA_MODEL", raising=False)
    demo = space_app.build_demo()
    assert isinstance(demo, gr.Blocks) and not demo.is_running and demo.local_url is None  # built, not launched
    assert "/classify" in {f"/{d.api_name}" for d in demo.fns.values() if d.api_name}
    assert "report" not in {d.api_name for d in demo.fns.values()}  # no LLaVA model, no report tab
    monkeypatch.setenv("CHEXFICIENT_MODEL", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing: no such model folder; set CHEXFICIENT_MODEL"):
        space_app.build_demo()
    assert space_app.resolve_model("some-org/CheXficient") == "some-org/CheXficient"  # a Hub id passes through


def test_client_prediction_equals_a_direct_model_call(served, client):
    url, model_dir, _, files = served
    preview, plot, scores, reports = client.predict(handle_file(str(files["png"])), FINDINGS, api_name="/classify")
    expected = direct_probabilities(
        model_dir, files["png"], ["Cardiomegaly", "Pleural Effusion", "Pneumothorax", "No Finding"]
    )
    assert list(scores) == list(expected)
    np.testing.assert_allclose(list(scores.values()), list(expected.values()), atol=1e-6)
    assert plot["columns"] == ["finding", "probability"] and plot["mark"] == "bar"
    assert {row[0]: row[1] for row in plot["data"]} == pytest.approx(expected, abs=1e-4)

    # the preview is the model input with the normalisation undone
    processor = CheXficientProcessor.from_pretrained(model_dir)
    pixels = processor(images=[files["png"]])["pixel_values"][0]
    mean, std = torch.tensor(processor.image_processor.image_mean), torch.tensor(processor.image_processor.image_std)
    shown = np.asarray(PIL.Image.open(preview).convert("RGB"))
    assert shown.shape[0] >= space_app.PREVIEW_MIN_SIZE and shown.shape[0] % 28 == 0
    scale = shown.shape[0] // 28
    expected_pixels = ((pixels * std.view(-1, 1, 1) + mean.view(-1, 1, 1)).clamp(0, 1) * 255).round().permute(1, 2, 0)
    np.testing.assert_array_equal(shown[::scale, ::scale], expected_pixels.to(torch.uint8).numpy())

    # the closest reports, by cosine similarity with the bank's text embeddings
    bank = space_app.load_report_bank(space_app.DEFAULT_REPORT_BANK)
    model = CheXficientModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        image_embeds = model.get_image_features(pixels[None])
        text = processor(text=bank)
        similarity = (image_embeds @ model.get_text_features(text["input_ids"], text["attention_mask"]).t())[0]
    top = similarity.topk(3)
    assert [row[1] for row in reports["data"]] == [bank[i] for i in top.indices.tolist()]
    assert [row[0] for row in reports["data"]] == pytest.approx(top.values.tolist(), abs=1e-3)


def test_dicom_upload_is_scored_like_the_model_scores_it(served, client):
    _, model_dir, _, files = served
    expected = direct_probabilities(model_dir, files["dicom"], ["Edema", "Atelectasis"])
    for key in ("dicom", "dicom_no_suffix"):  # PACS exports often have no suffix; the DICM magic is enough
        _, _, scores, _ = client.predict(handle_file(str(files[key])), "Edema, Atelectasis", api_name="/classify")
        np.testing.assert_allclose(list(scores.values()), list(expected.values()), atol=1e-6)


def test_bad_uploads_are_errors_naming_the_file_and_the_app_stays_up(served, client):
    _, _, _, files = served
    for key, reason in (
        ("corrupt_dicom", "broken.dcm: .*DICOM"),
        ("text_as_png", "notes.png: not a recognised image"),
        ("text", "report.txt: not a recognised image"),
    ):
        with pytest.raises(AppError, match=reason):
            client.predict(handle_file(str(files[key])), "Cardiomegaly", api_name="/classify")
    with pytest.raises(AppError, match="at least one finding"):
        client.predict(handle_file(str(files["png"])), " , ", api_name="/classify")
    _, _, scores, _ = client.predict(handle_file(str(files["png"])), "Cardiomegaly", api_name="/classify")
    assert 0.0 <= scores["Cardiomegaly"] <= 1.0


def test_report_tab_generates_what_the_llava_model_generates(served, client):
    _, _, llava_dir, files = served
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    report = client.predict(handle_file(str(files["png"])), "Shortness of breath.", 16, api_name="/report")
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    instruction = (
        "Provide a description of the findings in the radiology image given the following indication: "
        "Shortness of breath."
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = CheXficientImageProcessor().load_image(files["png"]).convert("RGB")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    expected = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    assert report == expected and report
    with pytest.raises(AppError, match="broken.dcm"):
        client.predict(handle_file(str(files["corrupt_dicom"])), "", 16, api_name="/report")


def test_browser_upload_draws_the_bars_and_shows_errors(served):
    from playwright.sync_api import sync_playwright

    url, _, _, files = served
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = screenshot.launch_browser(playwright)  # the system Chromium, headless
        try:
            page = screenshot.open_app(browser, url)
            screenshot.upload(page, files["png"])
            assert screenshot.wait_for_bars(page, len(CHEXPERT_LABELS)) == 14
            page.locator("#preview img").first.wait_for(state="visible")
            page.screenshot(path=str(ARTIFACTS / "space_browser.png"), full_page=True)
            assert (ARTIFACTS / "space_browser.png").stat().st_size > 10_000

            screenshot.upload(page, files["corrupt_dicom"])
            assert "broken.dcm" in screenshot.wait_for_error(page, "broken.dcm")
            page.wait_for_timeout(800)  # the toast slides in
            page.screenshot(path=str(ARTIFACTS / "space_browser_error.png"))

            # still up: edit the findings, upload a good image again, get a new plot
            page.locator("#findings textarea").fill("Cardiomegaly, Edema, Pneumothorax")
            screenshot.upload(page, files["dicom"])
            assert screenshot.wait_for_bars(page, 3) == 3
        finally:
            browser.close()
