"""The console in a real browser (headless Chromium driven by Selenium).

Run by tests/it/console.rs against a real controller with a tokens file and
simulated subscribers; it is told, in the environment:

  CONSOLE_URL        the console (http://127.0.0.1:PORT/)
  COMMANDER_TOKEN, APPROVER_TOKEN, VIEWER_TOKEN
  SUBSCRIBERS        channel=count,... of the connected subscribers that ack
  REJECTING          channel=count,... of those that reject every snapshot
  REJECT_REASON      the reason they give (it holds HTML)
  CLI_APPLY          a JSON list: the `safemode mode apply` command to run
  SCREENSHOTS        the directory for screenshots of the main views
  OPEN_CONSOLE_URL   the console of a server without a tokens file

Every wait has a deadline (WebDriverWait polls); nothing sleeps for a fixed
time. Exit 0 when every scenario held; otherwise the failure, the page's text
and a screenshot (failure.png).
"""

import base64
import json
import os
import subprocess
import sys
import traceback

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

URL = os.environ["CONSOLE_URL"]
TOKENS = {
    "commander": os.environ["COMMANDER_TOKEN"],
    "approver": os.environ["APPROVER_TOKEN"],
    "viewer": os.environ["VIEWER_TOKEN"],
}
SUBSCRIBERS = {
    channel: int(count)
    for channel, count in (pair.split("=") for pair in os.environ["SUBSCRIBERS"].split(","))
}
REJECTING = {
    channel: int(count)
    for channel, count in (pair.split("=") for pair in os.environ["REJECTING"].split(","))
}
REJECT_REASON = os.environ["REJECT_REASON"]
CLI_APPLY = json.loads(os.environ["CLI_APPLY"])
SHOTS = os.environ["SCREENSHOTS"]
OPEN_URL = os.environ["OPEN_CONSOLE_URL"]
XSS = '<img src=x onerror="window.__xss = true">'
# Generous: CI runs this beside the rest of the suite on two cores.
DEADLINE = 30


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for argument in [
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1800",
        "--no-first-run",
    ]:
        options.add_argument(argument)
    service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(service=service, options=options)


class Console:
    def __init__(self, driver):
        self.d = driver

    def wait(self, what, condition, timeout=DEADLINE):
        try:
            # The page redraws what changed: an element found a moment ago
            # may be gone, and is found again.
            return WebDriverWait(
                self.d, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
            ).until(lambda d: condition())
        except TimeoutException:
            raise AssertionError(f"not within {timeout}s: {what}") from None

    def find(self, css):
        return self.d.find_element(By.CSS_SELECTOR, css)

    def all(self, css):
        return self.d.find_elements(By.CSS_SELECTOR, css)

    def text(self, css):
        return self.wait(f"the text of {css}", lambda: self.find(css).text or " ")

    def click(self, css):
        self.wait(f"{css} is clicked", lambda: self.find(css).click() or True)

    def visible(self, css):
        found = self.all(css)
        return bool(found) and found[0].is_displayed()

    def shot(self, name):
        """The whole page, not only the window."""
        path = os.path.join(SHOTS, f"{name}.png")
        shot = self.d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        with open(path, "wb") as file:
            file.write(base64.b64decode(shot["data"]))
        print(f"screenshot {path}")

    def sign_in(self, role):
        self.d.get(URL)
        self.wait("the token field", lambda: self.visible("#token"))
        # By keyboard: the field has focus, Enter signs in.
        self.wait("the token field has focus", lambda: self.d.switch_to.active_element.get_attribute("id") == "token")
        self.d.switch_to.active_element.send_keys(TOKENS[role], Keys.ENTER)
        self.wait(f"{role} is signed in", lambda: self.visible("#main"))
        self.wait("WhoAmI named the principal", lambda: f"Signed in as {role}" in self.find("#whoami").text)
        self.wait("the event stream is live", lambda: self.find("#live").text == "Live")

    def sign_out(self):
        self.find("#signout").click()
        self.wait("signed out", lambda: self.visible("#token"))

    def confirm(self, reason, preview=True):
        """Fills the open dialog's reason, previews, checks the preview, confirms."""
        self.wait("the dialog opens", lambda: self.visible("#confirm"))
        self.find("#confirm-reason").send_keys(reason)
        if preview:
            self.find("#confirm-preview-button").click()
            self.wait(
                "the dry run's preview",
                lambda: self.all("#confirm-preview .preview-summary") or self.visible("#confirm-error"),
            )
            assert not self.visible("#confirm-error"), self.find("#confirm-error").text
        text = self.find("#confirm").text
        self.find("#confirm-button").click()
        self.wait("the dialog closes", lambda: not self.visible("#confirm") or self.visible("#confirm-error"))
        assert not self.visible("#confirm-error"), self.find("#confirm-error").text
        return text

    def forged(self, method, body):
        """A call the page does not offer, made with the signed-in token."""
        return self.d.execute_async_script(
            """
            const [method, body, done] = arguments;
            const token = sessionStorage.getItem("safemode.token");
            fetch(`/api/v1/${method}`, {
              method: "POST",
              headers: {"Content-Type": "application/json", "Authorization": `Bearer ${token}`},
              body: JSON.stringify(body),
            }).then(async (r) => done([r.status, await r.text()]), (e) => done([0, String(e)]));
            """,
            method,
            body,
        )

    def bars_synced(self):
        """Every acking subscriber SYNCED, every rejecting one REJECTED, as
        each channel's bar says in words."""
        for channel, count in SUBSCRIBERS.items():
            rejecting = REJECTING.get(channel, 0)
            bars = self.all(f'#propagation li[data-channel="{channel}"] .counts')
            expected = f"{count} of {count + rejecting} SYNCED"
            if not bars or not bars[0].text.startswith(expected):
                return False
            if rejecting and f"{rejecting} REJECTED" not in bars[0].text:
                return False
        return True

    def no_action_offered(self):
        for css in ["button.approve", "button.resolve", "button.escalate", "button.lift", "button.withdraw"]:
            assert not self.all(css), f"{css} is offered"
        assert not self.visible("#actions-section"), "the actions are offered"


def scenario(c):
    # --- A commander declares; the bars reach every simulated subscriber.
    c.sign_in("commander")
    c.wait("nothing is active at first", lambda: c.visible("#nothing-active"))
    c.shot("01-signed-in-nothing-active")
    c.d.execute_script("window.__sameDocument = true;")
    Select(c.find("#declare-runbook")).select_by_value("credential-stuffing")
    Select(c.find("#declare-severity")).select_by_value("sev3")
    stage = c.find("#declare-stage").text
    assert "throttle-high-risk" in stage and "step-up-account-changes" in stage, stage
    assert "Agents are told" in stage and "credential-stuffing attack" in stage, stage
    c.click("#declare-button")
    text = c.confirm("sign-in failures at 40x baseline")
    assert "This will:" in text, text
    c.wait("the incident is shown", lambda: c.all("li.incident"))
    incident_id = c.wait("the incident's id", lambda: c.find("li.incident").get_attribute("data-incident-id"))
    incident = c.text("li.incident")
    assert "SEV3" in incident and "declared" in incident, incident
    c.wait(f"every subscriber SYNCED {SUBSCRIBERS}", c.bars_synced)
    # The subscriber that rejects is named with its reason, as text.
    c.wait("the rejecting subscriber is listed", lambda: "email-rejecting" in c.text("#rejected"))
    rejected = c.text("#rejected li.state-rejected")
    assert rejected.startswith("REJECTED: email-rejecting (email, on ") and rejected.endswith(REJECT_REASON), rejected
    assert c.d.execute_script("return document.querySelectorAll('#rejected b').length;") == 0, "the reason was parsed as HTML"
    c.shot("02-declared-propagated")

    # --- A mode applied from the CLI appears without a reload.
    cli = subprocess.run(CLI_APPLY, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, f"{CLI_APPLY}: {cli.stderr}"
    c.wait("the CLI's mode appears", lambda: c.all('tr.activation[data-mode="incident-notice"]'))
    assert c.d.execute_script("return window.__sameDocument === true;"), "the page was reloaded"
    c.wait("what customers are told now", lambda: "are working on it" in c.text('#told li.told[data-channels~="web"]'))
    c.wait(f"every subscriber SYNCED again {SUBSCRIBERS}", c.bars_synced)

    # --- A reason holding HTML shows as text and runs nothing.
    c.find('#apply-modes input[value="bots-faq-only"]').click()
    c.find('#apply-channels input[value="chatbot"]').click()
    c.find("#apply-button").click()
    c.confirm(XSS)
    c.wait("the applied mode", lambda: c.all('tr.activation[data-mode="bots-faq-only"]'))
    cell = c.text('tr.activation[data-mode="bots-faq-only"] td.reason')
    assert cell == XSS, cell
    assert c.d.execute_script("return document.querySelectorAll('img').length;") == 0, "an <img> was made"
    assert c.d.execute_script("return window.__xss === undefined;"), "the onerror ran"
    c.shot("03-in-force")

    # --- The commander asks to resolve: no approval offered to them.
    c.click(f'li.incident[data-incident-id="{incident_id}"] button.resolve')
    text = c.confirm("failed sign-ins back to baseline")
    assert "second approver" in text, text
    c.wait("the request waits", lambda: c.all("li.request"))
    request_id = c.wait("the request's id", lambda: c.find("li.request").get_attribute("data-request-id"))
    request = c.text("li.request")
    assert "Approving it will:" in request, request
    assert not c.all("li.request button.approve"), "the requester is offered approval"
    assert c.all("li.request .own"), request
    c.shot("04-own-request")
    status, body = c.forged("Approve", {"requestId": request_id, "reason": "forged"})
    assert status == 403, (status, body)
    assert "permission_denied" in body, body

    # The modes outside the incident are lifted by the commander.
    for mode in ["incident-notice", "bots-faq-only"]:
        c.click(f'tr.activation[data-mode="{mode}"] button.lift')
        c.confirm(f"lifting {mode}")
        c.wait(f"{mode} is lifted", lambda: not c.all(f'tr.activation[data-mode="{mode}"]'))
    c.sign_out()

    # --- A viewer sees everything and can act on nothing.
    c.sign_in("viewer")
    c.wait("the incident, to the viewer", lambda: c.all("li.incident"))
    c.wait("the request, to the viewer", lambda: c.all("li.request"))
    c.wait("the bars, to the viewer", c.bars_synced)
    c.no_action_offered()
    c.find("#audit-button").click()
    c.wait("the audit log is verified", lambda: c.find("#audit-result").text.startswith("Verified"))
    assert c.text("#audit-head").strip(), "no head to copy"
    audit = c.text("#audit-entries")
    assert XSS in audit, "the reason shows as text in the audit log"
    assert c.d.execute_script("return document.querySelectorAll('img').length;") == 0
    c.shot("05-viewer-audit")
    for method, body in [
        ("ApplyModes", {"modes": ["bots-faq-only"], "reason": "forged"}),
        ("ResolveIncident", {"incidentId": incident_id, "reason": "forged"}),
        ("Approve", {"requestId": request_id, "reason": "forged"}),
        ("LiftActivations", {"targets": ["throttle-high-risk"], "reason": "forged", "all": True, "incidentOk": True}),
    ]:
        status, answer = c.forged(method, body)
        assert status == 403, (method, status, answer)
    # The decision preview, from the same compiled rules.
    Select(c.find("#decide-channel")).select_by_value("web")
    c.find("#decide-action").clear()
    c.find("#decide-action").send_keys("account.password_reset")
    c.find("#decide-button").click()
    c.wait("the decision", lambda: c.all("#decide-result .decide-effect"))
    assert c.find("#decide-result .decide-effect").text == "STEP_UP", c.find("#decide-result").text
    c.shot("06-decision-preview")
    c.sign_out()

    # --- An approver approves; the page returns to "nothing active".
    c.sign_in("approver")
    c.wait("the approve button", lambda: c.all(f'li.request[data-request-id="{request_id}"] button.approve'))
    assert not c.visible("#actions-section"), "an approver is offered commander actions"
    # By keyboard: Enter on the button; the reason has focus; Tab reaches
    # the preview of what approving will change; Enter; then Confirm.
    c.wait("the approve button is reached", lambda: c.find(f'li.request[data-request-id="{request_id}"] button.approve').send_keys(Keys.ENTER) or True)
    c.wait("the dialog opens", lambda: c.visible("#confirm"))
    assert "Approving it will:" in c.text("#confirm-context"), c.text("#confirm-context")
    c.wait("the reason has focus", lambda: c.d.switch_to.active_element.get_attribute("id") == "confirm-reason")
    c.d.switch_to.active_element.send_keys("baseline for 24h, checked", Keys.TAB)
    assert c.d.switch_to.active_element.get_attribute("id") == "confirm-preview-button", "Tab does not reach Preview"
    c.d.switch_to.active_element.send_keys(Keys.ENTER)
    c.wait("the approval's preview", lambda: c.all("#confirm-preview .preview-summary") or c.visible("#confirm-error"))
    assert not c.visible("#confirm-error"), c.text("#confirm-error")
    preview = c.text("#confirm-preview")
    assert "lift" in preview and "Effects that change" in preview, preview
    c.shot("07-approve-preview")
    c.wait("Confirm has focus", lambda: c.d.switch_to.active_element.get_attribute("id") == "confirm-button")
    c.d.switch_to.active_element.send_keys(Keys.ENTER)
    c.wait("the dialog closes", lambda: not c.visible("#confirm") or c.visible("#confirm-error"))
    assert not c.visible("#confirm-error"), c.text("#confirm-error")
    c.wait("nothing is active again", lambda: c.visible("#nothing-active"))
    assert not c.all("li.request") and not c.all("li.incident") and not c.all("tr.activation")
    c.wait(f"every subscriber SYNCED at the end {SUBSCRIBERS}", c.bars_synced)
    c.shot("08-approved-nothing-active")


def without_tokens(c):
    """A server without a tokens file: the page asks for a name (the CLI's
    --principal) and records changes under it."""
    c.d.get(OPEN_URL)
    c.wait("the name field", lambda: c.visible("#principal"))
    assert not c.visible("#token"), "a token is asked for"
    c.wait("the name field has focus", lambda: c.d.switch_to.active_element.get_attribute("id") == "principal")
    c.d.switch_to.active_element.send_keys("alice", Keys.ENTER)
    c.wait("alice is signed in", lambda: "Signed in as alice (admin)" in c.find("#whoami").text)
    c.wait("the event stream is live", lambda: c.find("#live").text == "Live")
    c.find('#apply-modes input[value="incident-notice"]').click()
    c.click("#apply-button")
    c.confirm("recorded under alice")
    c.wait("alice's mode", lambda: c.all('tr.activation[data-mode="incident-notice"]'))
    row = c.text('tr.activation[data-mode="incident-notice"]')
    assert "alice" in row, row
    c.find("#signout").click()
    c.wait("signed out, asked for a name again", lambda: c.visible("#principal"))


def main():
    os.makedirs(SHOTS, exist_ok=True)
    driver = browser()
    console = Console(driver)
    try:
        scenario(console)
        without_tokens(console)
        errors = [
            entry
            for entry in driver.get_log("browser")
            if entry.get("level") == "SEVERE" and "/api/v1/" not in entry.get("message", "")
        ]
        assert not errors, f"errors in the browser console: {errors}"
        print("console browser test: every scenario held")
        return 0
    except BaseException:
        traceback.print_exc()
        try:
            console.shot("failure")
            print("page text at the failure:\n" + driver.find_element(By.TAG_NAME, "body").text)
        except Exception:
            pass
        return 1
    finally:
        driver.quit()


if __name__ == "__main__":
    sys.exit(main())
