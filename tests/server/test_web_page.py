"""The chat page in headless Chromium: load /, type a message, see a streamed answer, take a screenshot."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cdp import Browser, find_chromium

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


async def _chat_in_page(chromium: str, url: str, message: str, shot: Path) -> dict:
    async with Browser(chromium) as b:
        await b.navigate(url + "/")
        model = await b.wait_for("(() => { const t = document.getElementById('model').textContent;"
                                 " return t.includes('loading') ? '' : t; })()")
        await b.eval("document.getElementById('temperature').value = '0';"
                     "document.getElementById('max_tokens').value = '24';"
                     "document.getElementById('input').focus()")
        await b.type_text(message)
        await b.press_enter()
        await b.wait_for("document.querySelector('.user') !== null")
        answer = await b.wait_for("(() => { const a = document.querySelector('.assistant');"
                                  " return a && a.dataset.done === '1' ? a.textContent : ''; })()", timeout=120)
        status = await b.eval("document.getElementById('status').textContent")
        errors = await b.eval("document.querySelectorAll('.error').length")
        ARTIFACTS.mkdir(exist_ok=True)
        await b.screenshot(str(shot))
        return {"model": model, "answer": answer, "status": status, "errors": errors}


def run_page_test(url: str, expect_model: str, shot_name: str) -> dict:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    shot = ARTIFACTS / shot_name
    res = asyncio.run(_chat_in_page(chromium, url, "Hello! What is 2+2?", shot))
    assert res["model"] == expect_model
    assert res["errors"] == 0
    assert res["answer"].strip(), res
    assert "completion tokens" in res["status"], res  # the usage chunk at the end of the stream arrived
    assert shot.stat().st_size > 1000
    return res


def test_web_page_fake_engine(fake, fake_url):
    res = run_page_test(fake_url, "fake-model", "web_chat_fake.png")
    assert res["answer"] == "a" * 24  # greedy fake sampler, max_tokens from the page's setting
    assert "24 completion tokens" in res["status"]


def test_web_page_real_engine(real, real_url):
    import openai

    res = run_page_test(real_url, real.engine.model_name, "web_chat.png")
    api = openai.OpenAI(base_url=real_url + "/v1", api_key="none", max_retries=0).chat.completions.create(
        model=None, messages=[{"role": "user", "content": "Hello! What is 2+2?"}], temperature=0, max_tokens=24)
    assert res["answer"] == api.choices[0].message.content  # the page showed the whole streamed (greedy) answer
    assert f"{api.usage.completion_tokens} completion tokens" in res["status"]
