"""The student, teacher and dashboard pages in headless Chromium.

Chromium comes from the system (Debian package ``chromium``) and Playwright for
Python drives it through ``executable_path``; Playwright's own browser download
is never used. The screenshots land in tests/artifacts/ and, for the README, in
docs/screenshots/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Server, start_server, stop_server
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    expect,
    sync_playwright,
)

from shardchat import tokens

ROOT = Path(__file__).resolve().parent.parent
PAGES_DIR = ROOT / "shardchat" / "pages"
ARTIFACTS_DIR = ROOT / "tests" / "artifacts"
SCREENSHOTS_DIR = ROOT / "docs" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
]
NPM_CI_TIMEOUT_S = 300
EXPECT_TIMEOUT_MS = 10_000
WIDE = {"width": 1440, "height": 900}
NARROW = {"width": 960, "height": 820}

TEACHER = "teacher-ana"
STUDENTS = ("student-ben", "student-cleo")


@pytest.fixture(scope="module")
def pages_installed() -> None:
    """Install the pages' phoenix.js with npm ci unless it is already there."""
    if (PAGES_DIR / "node_modules" / "phoenix").is_dir():
        return
    npm = shutil.which("npm")
    assert npm is not None, (
        "npm is not installed: the pages need `npm ci --prefix shardchat/pages` "
        "(for example `apt-get install -y nodejs npm`)"
    )
    completed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(PAGES_DIR)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
        text=True,
        timeout=NPM_CI_TIMEOUT_S,
    )
    assert completed.returncode == 0, f"npm ci failed:\n{completed.stdout}"


@pytest.fixture
def page_server(tmp_path, pages_installed) -> Iterator[Server]:
    running = start_server(tmp_path / "server")
    yield running
    status = stop_server(running)
    assert status == 0, running.log_text()[-4000:]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), (
        f"{CHROMIUM} not found: install Chromium with "
        "`apt-get update && apt-get install -y chromium`"
    )
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


class PageErrors:
    """Uncaught script errors and console errors of the pages opened in a test."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def watch(self, page: Page) -> Page:
        page.on("pageerror", lambda error: self.on_page_error(page, error))
        page.on("console", lambda message: self.on_console(page, message))
        return page

    def on_page_error(self, page: Page, error: Exception) -> None:
        self.errors.append(f"{page.url}: {error}")

    def on_console(self, page: Page, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"{page.url}: console: {message.text}")


@pytest.fixture
def page_errors() -> PageErrors:
    return PageErrors()


@pytest.fixture
def open_page(browser, page_errors) -> Iterator[Callable[[str, dict], Page]]:
    """Open URLs, each in a fresh browser context so each user has its own storage.

    The contexts close when the test ends.
    """
    contexts: list[BrowserContext] = []

    def open_url(url: str, viewport: dict) -> Page:
        context = browser.new_context(viewport=viewport)
        contexts.append(context)
        page = page_errors.watch(context.new_page())
        page.goto(url)
        return page

    yield open_url
    for context in contexts:
        context.close()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS_DIR / name), full_page=True)


def publish_screenshots(names: list[str]) -> None:
    """Copy the final screenshots from tests/artifacts/ to docs/screenshots/."""
    SCREENSHOTS_DIR.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(ARTIFACTS_DIR / name, SCREENSHOTS_DIR / name)


def chat_log(server: Server, chat_id: str) -> dict:
    status, body = server.get(f"/chats/{chat_id}/messages")
    assert status == 200, body
    return json.loads(body)


def send(scope: Locator, text: str) -> None:
    """Type `text` into the message box inside `scope` and send it with Enter."""
    box = scope.locator("textarea")
    expect(box).to_be_enabled()
    box.fill(text)
    box.press("Enter")
    expect(box).to_have_value("")


def test_pages_tutoring_end_to_end(open_page, page_server, page_errors):
    url = page_server.url
    teacher = open_page(
        f"{url}/teacher?token={page_server.token(TEACHER, 'teacher')}",
        WIDE,
    )
    expect(teacher.locator("#connection")).to_have_text("Connected")
    expect(teacher.locator("#user")).to_have_text(f"Signed in as {TEACHER}")
    expect(teacher.locator("#no-chats")).to_be_visible()

    # Both students queue up; the second is behind the first.
    students = {}
    for student_id in STUDENTS:
        token = page_server.token(student_id, "student")
        page = open_page(f"{url}/student?token={token}", NARROW)
        expect(page.locator("#connection")).to_have_text("Connected")
        page.get_by_role("button", name="Ready").click()
        students[student_id] = page
    expect(students[STUDENTS[0]].locator("#position")).to_have_text(
        "You are next in line."
    )
    expect(students[STUDENTS[1]].locator("#position")).to_have_text(
        "You are number 2 in the queue."
    )
    expect(teacher.locator("#count-waiting")).to_have_text("2")

    # The teacher claims both, in queue order, each into its own pane.
    claim = teacher.get_by_role("button", name="Claim next student")
    panes = {}
    for student_id in STUDENTS:
        expect(claim).to_be_enabled()
        claim.click()
        expect(teacher.locator("#claim-status")).to_have_text(f"Claimed {student_id}.")
        pane = teacher.locator(
            "article.chat", has=teacher.get_by_role("heading", name=student_id)
        )
        expect(pane.locator(".chat-state")).to_have_text("Live")
        panes[student_id] = pane
    expect(teacher.locator("#no-chats")).to_be_hidden()
    expect(teacher.locator("#count-chatting")).to_have_text("2")

    # Messages both ways in both chats.
    for student_id, page in students.items():
        expect(page.locator("#chat-title")).to_have_text(f"Chat with {TEACHER}")
        expect(page.locator("#chat-state")).to_have_text("Live")
        question = f"Hi {student_id}, what is 7 × 8?"
        send(panes[student_id], question)
        expect(page.locator(".message-theirs .message-body")).to_have_text([question])
        send(page.locator("#composer"), "It is 56.")
        expect(panes[student_id].locator(".message-theirs .message-body")).to_have_text(
            ["It is 56."]
        )
        send(panes[student_id], "Correct, well done!")
        expect(page.locator(".message-theirs .message-body")).to_have_text(
            [question, "Correct, well done!"]
        )
        expect(page.locator(".message-mine .message-body")).to_have_text(["It is 56."])

    dashboard = open_page(f"{url}/dashboard", WIDE)
    expect(dashboard.locator("#connection")).to_have_text("Live")
    expect(dashboard.locator("#teachers-total")).to_have_text("1")
    expect(dashboard.locator("#teachers-detail")).to_have_text("1 in chats · 0 free")
    expect(dashboard.locator("#students-total")).to_have_text("2")
    expect(dashboard.locator("#queue-length")).to_have_text("0")
    expect(dashboard.locator("#chats-total")).to_have_text("2")
    rows = dashboard.locator("#chats-body tr")
    expect(rows).to_have_count(2)
    for student_id in STUDENTS:
        row = rows.filter(has_text=student_id)
        expect(row.locator("td").nth(1)).to_have_text(TEACHER)
        # Messages column: three messages per chat, once the chat log commits.
        expect(row.locator("td").nth(4)).to_have_text("3")
    expect(dashboard.locator("#workers-body tr")).to_have_count(2)
    expect(dashboard.locator("#messages-rate")).to_contain_text("messages/s")

    screenshot(teacher, "teacher.png")
    screenshot(students[STUDENTS[0]], "student.png")
    screenshot(dashboard, "dashboard.png")

    # The teacher ends both chats; each side shows why, students may queue again.
    chat_ids = {
        student_id: pane.get_attribute("data-chat")
        for student_id, pane in panes.items()
    }
    for student_id, pane in panes.items():
        pane.get_by_role("button", name="End chat").click()
        expect(pane.locator(".chat-state")).to_have_text("Ended")
        expect(pane.locator(".transcript-note")).to_have_text(
            ["The teacher ended the chat."]
        )
        expect(pane.get_by_role("button", name="Close")).to_be_visible()
        page = students[student_id]
        expect(page.locator("#chat-state")).to_have_text("Ended")
        expect(page.locator(".transcript-note")).to_have_text(
            ["The teacher ended the chat."]
        )
        expect(page.locator("#answer")).to_be_disabled()
        expect(page.get_by_role("button", name="Ready")).to_be_enabled()
    expect(dashboard.locator("#chats-body")).to_have_text("No chats in progress.")
    expect(teacher.locator("#count-finished")).to_have_text("2")

    for student_id, chat_id in chat_ids.items():
        log = chat_log(page_server, chat_id)
        assert log["chat"]["student_id"] == student_id
        assert log["chat"]["end_reason"] == "teacher_ended"
        assert [message["sender"] for message in log["messages"]] == [
            "teacher",
            "student",
            "teacher",
        ]
        assert log["messages"][1]["body"] == "It is 56."

    screenshot(teacher, "teacher-ended.png")
    publish_screenshots(["student.png", "teacher.png", "dashboard.png"])
    assert page_errors.errors == []


def test_pages_index_links(open_page, page_server, page_errors):
    page = open_page(page_server.url + "/", NARROW)

    links = page.locator("ul.links a")
    expect(links).to_have_count(3)
    for name, path in (
        ("Student", "/student"),
        ("Teacher", "/teacher"),
        ("Dashboard", "/dashboard"),
    ):
        heading = page.get_by_role("heading", name=name, exact=True)
        expect(links.filter(has=heading)).to_have_attribute("href", path)
    assert page_errors.errors == []


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_pages_missing_token_notice(open_page, page_server, page_errors, role):
    page = open_page(f"{page_server.url}/{role}", NARROW)

    notice = page.get_by_role("alert")
    expect(notice.locator("strong")).to_have_text(
        "This page needs a token in its address."
    )
    expect(notice).to_contain_text(f"shardchat token --user ID --role {role}")
    expect(page.locator("#connection")).to_have_text("Not connected")
    screenshot(page, f"{role}-missing-token.png")
    assert page_errors.errors == []


def test_pages_wrong_role_notice(open_page, page_server, page_errors):
    token = page_server.token("student-dan", "student")
    page = open_page(f"{page_server.url}/teacher?token={token}", NARROW)

    expect(page.get_by_role("alert").locator("strong")).to_have_text(
        "This token is for a student, not a teacher."
    )
    assert page_errors.errors == []


def test_pages_rejected_token_notice(open_page, page_server, page_errors):
    forged = tokens.mint(b"\x00" * tokens.SECRET_BYTES, "student-eve", "student")
    page = open_page(f"{page_server.url}/student?token={forged}", NARROW)

    expect(page.get_by_role("alert").locator("strong")).to_have_text(
        "The server rejected the connection: the token is invalid or expired."
    )
    expect(page.locator("#connection")).to_have_text("Not connected")
    expect(page.get_by_role("button", name="Ready")).to_be_disabled()
    screenshot(page, "student-rejected-token.png")
    # Chromium logs the rejected websocket handshake (403) as a console error.
    assert [error for error in page_errors.errors if "403" not in error] == []
