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
  TLS_CONSOLE_URL    the console of a server with TLS (https://127.0.0.1:PORT/)
  TLS_SPKI           base64 SHA-256 of that server's public key (SPKI), the
                     one key Chromium is told to accept without a known CA
  OPEN_TLS_CONSOLE_URL  the console of a server with TLS and no tokens file
  STALL_CONSOLE_URL  the console of a server on etcd
  ETCD_PID           that etcd's pid, paused (SIGSTOP) to stall the store
  INSIGHTS_CONSOLE_URL  the console of a server whose channels are scoped so
                     that the agent desk is the easiest path for account
                     changes, with channels that decided and reported
  HOSTILE_SUBSCRIBER the id (markup) of that server's IVR, which rejects the
                     policy in force and decides on an old revision
  CLI_SIGNAL         a JSON list: `safemode signal login.failed --count 250
                     --channel ivr` against that server
  CLI_INCIDENT       a JSON list: `safemode incident show credential-stuffing
                     --output json` against that server
  INSIGHTS_TRUSTED_KEYS  the key file the CLI trusts for that server
  DETECTOR_TOKEN     an external detector's token (raises proposals)
  SILENT_CONSOLE_URL the console of replica r-a of two, whose peer r-b never
                     answers

Every wait has a deadline (WebDriverWait polls); nothing sleeps for a fixed
time. Exit 0 when every scenario held; otherwise the failure, the page's text
and a screenshot (failure.png).
"""

import base64
import json
import os
import signal
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
    "detector": os.environ["DETECTOR_TOKEN"],
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
TLS_URL = os.environ["TLS_CONSOLE_URL"]
TLS_SPKI = os.environ["TLS_SPKI"]
OPEN_TLS_URL = os.environ["OPEN_TLS_CONSOLE_URL"]
STALL_URL = os.environ["STALL_CONSOLE_URL"]
ETCD_PID = int(os.environ["ETCD_PID"])
INSIGHTS_URL = os.environ["INSIGHTS_CONSOLE_URL"]
SILENT_URL = os.environ["SILENT_CONSOLE_URL"]
HOSTILE = os.environ["HOSTILE_SUBSCRIBER"]
CLI_SIGNAL = json.loads(os.environ["CLI_SIGNAL"])
CLI_INCIDENT = json.loads(os.environ["CLI_INCIDENT"])
INSIGHTS_ENV = {**os.environ, "SAFEMODE_TRUSTED_KEYS": os.environ["INSIGHTS_TRUSTED_KEYS"]}
# Windows of one browser on one console: more than the six connections a
# browser holds to one host over HTTP/1.1, and than a principal's streams.
TABS = 7
XSS = '<img src=x onerror="window.__xss = true">'
# Generous: CI runs this beside the rest of the suite on two cores.
DEADLINE = 30
# Every replica evaluates the runbook triggers every 10 s over the fleet's
# signals: a proposal is raised within a few passes.
PROPOSAL_DEADLINE = 60


def browser(extra=()):
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for argument in [
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1800",
        "--no-first-run",
        *extra,
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

    def sign_in(self, role, url=URL):
        self.d.get(url)
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

    def forged(self, method, body, role=None):
        """A call the page does not offer, made with the signed-in token (or
        `role`'s), beside the page."""
        return self.d.execute_async_script(
            """
            const [method, body, given, done] = arguments;
            const token = given || sessionStorage.getItem("safemode.token");
            fetch(`/api/v1/${method}`, {
              method: "POST",
              headers: {"Content-Type": "application/json", "Authorization": `Bearer ${token}`},
              body: JSON.stringify(body),
            }).then(async (r) => done([r.status, await r.text()]), (e) => done([0, String(e)]));
            """,
            method,
            body,
            TOKENS[role] if role else None,
        )

    def focused_key(self):
        return self.d.switch_to.active_element.get_attribute("data-key")

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
    # A decision shown before the namespace moves is decided again after.
    decide(c, "web", "account.password_reset")
    assert c.find("#decide-result .decide-effect").text == "ALLOW", c.find("#decide-result").text
    before = c.find("#decide-result .decide-revision").text
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
    c.wait("the decision is recomputed at the new revision", lambda: c.all("#decide-result .recomputed"))
    c.wait("the decision now steps up", lambda: c.find("#decide-result .decide-effect").text == "STEP_UP")
    assert c.find("#decide-result .decide-revision").text != before, before
    c.wait(f"every subscriber SYNCED {SUBSCRIBERS}", c.bars_synced)
    # The subscriber that rejects is named with its reason, as text.
    c.wait("the rejecting subscriber is listed", lambda: "email-rejecting" in c.text("#rejected"))
    rejected = c.text("#rejected li.state-rejected")
    assert rejected.startswith("REJECTED: email-rejecting (email, on ") and rejected.endswith(REJECT_REASON), rejected
    assert c.d.execute_script("return document.querySelectorAll('#rejected b').length;") == 0, "the reason was parsed as HTML"
    c.shot("02-declared-propagated")

    # --- A change previewed in the dialog (its reason holds HTML); then a
    # mode is applied from the CLI: it appears without a reload, and the
    # preview is marked outdated, Confirm waiting for a new one.
    c.find('#apply-modes input[value="bots-faq-only"]').click()
    c.find('#apply-channels input[value="chatbot"]').click()
    c.find("#apply-button").click()
    c.wait("the dialog opens", lambda: c.visible("#confirm"))
    c.find("#confirm-reason").send_keys(XSS)
    c.find("#confirm-preview-button").click()
    c.wait("the dry run's preview", lambda: c.all("#confirm-preview .preview-summary"))
    assert c.find("#confirm-button").is_enabled(), "Confirm after a preview"
    cli = subprocess.run(CLI_APPLY, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, f"{CLI_APPLY}: {cli.stderr}"
    c.wait("the CLI's mode appears", lambda: c.all('tr.activation[data-mode="incident-notice"]'))
    assert c.d.execute_script("return window.__sameDocument === true;"), "the page was reloaded"
    c.wait("the preview is marked outdated", lambda: c.all("#confirm-preview .outdated"))
    assert not c.find("#confirm-button").is_enabled(), "Confirm on an outdated preview"
    assert "Outdated: the namespace moved from revision" in c.text("#confirm-preview .outdated")
    c.find("#confirm-preview-button").click()
    c.wait("a new preview", lambda: not c.all("#confirm-preview .outdated") and c.find("#confirm-button").is_enabled())
    c.find("#confirm-button").click()
    c.wait("the dialog closes", lambda: not c.visible("#confirm") or c.visible("#confirm-error"))
    assert not c.visible("#confirm-error"), c.find("#confirm-error").text
    c.wait("what customers are told now", lambda: "are working on it" in c.text('#told li.told[data-channels~="web"]'))
    c.wait(f"every subscriber SYNCED again {SUBSCRIBERS}", c.bars_synced)

    # --- A reason holding HTML shows as text and runs nothing.
    c.wait("the applied mode", lambda: c.all('tr.activation[data-mode="bots-faq-only"]'))
    cell = c.text('tr.activation[data-mode="bots-faq-only"] td.reason')
    assert cell == XSS, cell
    assert c.d.execute_script("return document.querySelectorAll('img').length;") == 0, "an <img> was made"
    assert c.d.execute_script("return window.__xss === undefined;"), "the onerror ran"
    c.shot("03-in-force")

    # --- Keyboard focus survives a live redraw: the Resolve button keeps
    # it while another incident, declared elsewhere, redraws the list.
    # A half-made choice (the new severity picked, not yet asked) survives
    # it too.
    severity = f'li.incident[data-incident-id="{incident_id}"] select.escalate-severity'
    Select(c.find(severity)).select_by_value("sev1")
    resolve = f'li.incident[data-incident-id="{incident_id}"] button.resolve'
    c.d.execute_script("document.querySelector(arguments[0]).focus();", resolve)
    assert c.focused_key() == f"resolve:{incident_id}", c.focused_key()
    status, body = c.forged("DeclareIncident", {"type": "fraud-spike", "severity": "sev3", "reason": "declared elsewhere"})
    assert status == 200, (status, body)
    other = json.loads(body)["incident"]["id"]
    c.wait("the other incident is drawn", lambda: c.all(f'li.incident[data-incident-id="{other}"]'))
    assert c.focused_key() == f"resolve:{incident_id}", f"focus went to {c.focused_key()!r}"
    assert Select(c.find(severity)).first_selected_option.get_attribute("value") == "sev1", "the chosen severity was lost"
    status, body = c.forged("ResolveIncident", {"incidentId": other, "reason": "declared elsewhere, resolved elsewhere"})
    assert status == 200, (status, body)
    c.wait("the other incident is gone", lambda: not c.all(f'li.incident[data-incident-id="{other}"]'))
    assert c.focused_key() == f"resolve:{incident_id}", f"focus went to {c.focused_key()!r}"

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
    decide(c, "web", "account.password_reset")
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


def decide(c, channel, action):
    """Asks the decision preview, and waits for its (new) answer."""
    Select(c.find("#decide-channel")).select_by_value(channel)
    c.find("#decide-action").clear()
    c.find("#decide-action").send_keys(action)
    c.d.execute_script("document.getElementById('decide-result').replaceChildren();")
    c.find("#decide-button").click()
    c.wait("the decision", lambda: c.all("#decide-result .decide-effect"))


def seven_tabs(c):
    """More console windows than a browser's connections to one host, all
    visible and live: they share one event stream, and each sees a change."""
    c.sign_out()
    first = c.d.current_window_handle
    windows = [first]
    c.sign_in("viewer")
    for _ in range(TABS - 1):
        c.d.switch_to.new_window("window")
        windows.append(c.d.current_window_handle)
        c.sign_in("viewer")
    for handle in windows:
        c.d.switch_to.window(handle)
        c.wait("every window is live", lambda: c.find("#live").text == "Live")
        assert not c.all('tr.activation[data-mode="incident-notice"]'), "applied already"
    cli = subprocess.run(CLI_APPLY, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, f"{CLI_APPLY}: {cli.stderr}"
    for i, handle in enumerate(windows):
        c.d.switch_to.window(handle)
        c.wait(f"window {i + 1} of {TABS} shows the CLI's mode", lambda: c.all('tr.activation[data-mode="incident-notice"]'))
        c.wait(f"window {i + 1} of {TABS} is live", lambda: c.find("#live").text == "Live")
        # The propagation (gathered once, by the tab holding the stream) is
        # of the new revision too.
        revision = c.find("#revision").text.rsplit(" ", 1)[-1]
        c.wait(
            f"window {i + 1} of {TABS} shows the propagation at revision {revision}",
            lambda: f"the namespace is at revision {revision}." in c.find("#propagation-summary").text,
        )
    c.shot("09-seven-tabs")
    for handle in windows[1:]:
        c.d.switch_to.window(handle)
        c.d.close()
    c.d.switch_to.window(first)
    c.sign_out()


def insights_view(c):
    """The Insights view: the static map names the agent desk as the easiest
    path for account changes; the live map names the IVR deciding on an old
    revision, its id (markup) shown as text; soft downtime names the IVR;
    signals reported with the real CLI appear; the view reads again when the
    namespace moves, and never has more than one read in flight."""
    cli = subprocess.run(CLI_SIGNAL, capture_output=True, text=True, timeout=60, env=INSIGHTS_ENV)
    assert cli.returncode == 0, f"{CLI_SIGNAL}: {cli.stderr}"
    c.sign_in("viewer", url=INSIGHTS_URL)
    # The page's reads of the insights, counted beside it.
    c.d.execute_script(
        """
        window.__insights = { inFlight: 0, most: 0, calls: 0 };
        const original = window.fetch;
        window.fetch = async (...args) => {
          const counted = String(args[0]).endsWith("/api/v1/GetInsights");
          if (counted) {
            window.__insights.calls++;
            window.__insights.inFlight++;
            window.__insights.most = Math.max(window.__insights.most, window.__insights.inFlight);
          }
          try {
            return await original(...args);
          } finally {
            if (counted) window.__insights.inFlight--;
          }
        };
        """
    )
    c.click("#view-insights")
    c.wait("the insights view", lambda: c.visible("#insights-view") and not c.visible("#overview-view"))
    assert c.find("#view-insights").get_attribute("aria-current") == "page"
    email = 'tr.action-map[data-action="account.email_change"]'
    c.wait("account.email_change in the map", lambda: c.all(email))
    outcomes = [li.text for li in c.all(f"{email} li.channel-outcome")]
    assert outcomes[0] == "agent-desk ALLOW ← easiest path", outcomes
    assert "easiest" in c.find(f"{email} li.channel-outcome").get_attribute("class")
    assert "web STEP_UP" in outcomes and "ivr STEP_UP" in outcomes, outcomes
    assert c.find(f"{email} td.easiest-channel").text.startswith("agent-desk"), c.find(email).text
    assert not c.all('tr.action-map[data-action="order.view"]'), "reading is in the map"
    # Live: the IVR still decides on the revision it had, named as text.
    c.wait("the IVR on an old revision", lambda: any(td.text == HOSTILE for td in c.all("#insights-live td.subscriber")))
    row = next(tr for tr in c.all("#insights-live tr.outcome") if HOSTILE in tr.text)
    assert "OLD revision" in row.find_element(By.CSS_SELECTOR, "td.notes").text, row.text
    assert c.d.execute_script("return document.querySelectorAll('img').length;") == 0, "an <img> was made"
    assert c.d.execute_script("return window.__xss === undefined;"), "the onerror ran"
    soft = c.text('#insights-soft li[data-channel="ivr"]')
    assert soft.startswith("ivr REJECTING: 1 of 1 subscribers rejected the policy in force"), soft
    c.wait("the CLI's signal", lambda: any(tr.text == "ivr login.failed 250" for tr in c.all("#insights-signals tr.signal")))
    # The IVR's report that came too soon, named as text.
    c.wait(
        "the IVR's refused report",
        lambda: any(
            tr.find_element(By.CSS_SELECTOR, "td.subscriber").text.startswith(HOSTILE + " (") and "too soon" in tr.text
            for tr in c.all("#insights-refused tr.refused")
        ),
    )
    assert "1 report(s) refused or cut short" in c.text("#insights-refused-total"), c.text("#insights-refused-total")
    # One replica, which answered: nothing partial.
    assert not c.visible("#insights-partial"), c.find("#insights-partial").text
    assert "answered" in c.text("#insights-replicas li.replica")
    assert "last 15m" in c.text("#insights-state"), c.text("#insights-state")
    c.shot("12-insights")
    # The 1-minute window; asked again and again while a read is under
    # way: one read at a time, the last asked for drawn.
    Select(c.find("#insights-window")).select_by_value("60")
    for _ in range(5):
        c.find("#insights-refresh").click()
    c.wait("the 1m window", lambda: "last 1m" in c.find("#insights-state").text)
    # The namespace moves: the view reads again, at the new revision.
    status, body = c.forged("ApplyModes", {"modes": ["incident-notice"], "reason": "status page"}, role="commander")
    assert status == 200, (status, body)
    revision = json.loads(body)["revision"]
    c.wait(f"the insights at revision {revision}", lambda: f"at revision {revision}," in c.find("#insights-state").text)
    c.wait("no read in flight", lambda: c.d.execute_script("return window.__insights.inFlight;") == 0)
    counted = c.d.execute_script("return window.__insights;")
    assert counted["most"] == 1, counted
    assert counted["calls"] >= 3, counted
    status, body = c.forged("LiftActivations", {"targets": ["incident-notice"], "reason": "done"}, role="commander")
    assert status == 200, (status, body)


def proposals_view(c):
    """Signals above the credential-stuffing trigger raise a proposal that
    the console shows (a count on the overview); a viewer reads it and can
    do nothing with it; a commander dismisses (a reason is needed) and
    accepts, which declares the incident, its timeline citing the
    evidence."""
    c.click("#view-overview")
    c.wait(
        "the open proposal's count",
        lambda: c.visible("#proposals-badge") and c.find("#proposals-badge").text == "1 open",
        timeout=PROPOSAL_DEADLINE,
    )
    banner = c.text("#proposals-banner")
    assert "1 open proposal: declare credential-stuffing sev3?" in banner, banner
    assert "login.failed counted 250 in 5m across the fleet, above 200 (ivr 250)" in banner, banner
    c.shot("13-proposal-badge")
    c.click("#proposals-banner-go")
    c.wait("the proposals view", lambda: c.visible("#proposals-view") and not c.visible("#overview-view"))
    card = c.text("li.proposal")
    proposal_id = c.find("li.proposal").get_attribute("data-proposal-id")
    trig = f'li.proposal[data-proposal-id="{proposal_id}"]'
    assert "declare credential-stuffing sev3?" in card, card
    assert "Evidence: login.failed counted 250 in 5m across the fleet, above 200 (ivr 250)" in card, card
    for words in ["Signal\nlogin.failed", "Window\n5m", "Channels\nivr 250", "250 across the fleet, above 200", "by trigger"]:
        assert words in card, (words, card)
    # Read only for a viewer; a forged call is refused.
    assert not c.all("li.proposal button.accept") and not c.all("li.proposal button.dismiss"), "a viewer is offered a decision"
    assert "A commander accepts or dismisses it." in card, card
    for method in ["AcceptProposal", "DismissProposal"]:
        status, body = c.forged(method, {"proposalId": proposal_id, "reason": "forged"})
        assert status == 403 and "permission_denied" in body, (method, status, body)
    c.shot("14-proposals-viewer")
    c.sign_out()

    c.sign_in("commander", url=INSIGHTS_URL)
    c.wait("the count, to the commander", lambda: c.find("#proposals-badge").text == "1 open")
    c.click("#view-proposals")
    c.wait("the accept button", lambda: c.all(f"{trig} button.accept"))
    # Keyboard focus survives a redraw: a detector raises another proposal
    # (its summary holds markup) while Accept has focus.
    c.d.execute_script("document.querySelector(arguments[0]).focus();", f"{trig} button.accept")
    status, body = c.forged(
        "RaiseProposal",
        {"type": "fraud-spike", "severity": "sev3", "summary": XSS, "reason": "alert refunds-high"},
        role="detector",
    )
    assert status == 200, (status, body)
    external = json.loads(body)["proposal"]["id"]
    ext = f'li.proposal[data-proposal-id="{external}"]'
    c.wait("the detector's proposal", lambda: c.all(ext))
    assert c.focused_key() == f"accept:{proposal_id}", f"focus went to {c.focused_key()!r}"
    assert c.find("#proposals-badge").text == "2 open"
    assert XSS in c.text(ext), c.text(ext)
    assert c.d.execute_script("return document.querySelectorAll('img').length;") == 0, "an <img> was made"
    # Dismissing without a reason is refused in the page: nothing is sent.
    c.click(f"{ext} button.dismiss")
    c.wait("the dialog opens", lambda: c.visible("#confirm"))
    c.find("#confirm-button").click()
    c.wait("the page asks for a reason", lambda: c.visible("#confirm-error"))
    assert c.text("#confirm-error") == "Give a reason: it is recorded with the change.", c.text("#confirm-error")
    assert c.d.switch_to.active_element.get_attribute("id") == "confirm-reason"
    c.find("#confirm-cancel").click()
    status, body = c.forged("ListProposals", {})
    assert [p["id"] for p in json.loads(body)["proposals"]] == [external, proposal_id], body
    # (The server refuses it too, in one line.)
    status, body = c.forged("DismissProposal", {"proposalId": external, "reason": " "})
    assert status == 400 and "say why the proposal is dismissed" in body, (status, body)
    # With a reason, it is dismissed, and listed closed with who and why.
    c.click(f"{ext} button.dismiss")
    c.confirm("a refund batch, not fraud", preview=False)
    c.wait("the dismissed proposal leaves the open list", lambda: not c.all(ext))
    closed_ext = f'tr.closed-proposal[data-proposal-id="{external}"]'
    c.wait("the dismissed proposal is listed closed", lambda: c.all(closed_ext))
    row = c.text(closed_ext)
    assert "dismissed at" in row and "commander" in row and "a refund batch, not fraud" in row, row
    # A refusal shows the server's one line: a proposal dismissed elsewhere
    # while the dialog is open.
    status, body = c.forged(
        "RaiseProposal",
        {"type": "fraud-spike", "severity": "sev2", "summary": "refunds 9x baseline", "reason": "alert refunds-higher"},
        role="detector",
    )
    assert status == 200, (status, body)
    other = json.loads(body)["proposal"]["id"]
    c.click(f'li.proposal[data-proposal-id="{other}"] button.dismiss')
    c.wait("the dialog opens", lambda: c.visible("#confirm"))
    c.find("#confirm-reason").send_keys("not fraud either")
    status, body = c.forged("DismissProposal", {"proposalId": other, "reason": "dismissed elsewhere first"})
    assert status == 200, (status, body)
    c.find("#confirm-button").click()
    c.wait("the server's refusal", lambda: c.visible("#confirm-error"))
    refusal = c.text("#confirm-error")
    assert "\n" not in refusal and f"proposal {other} was dismissed" in refusal, refusal
    assert "only an open proposal can be accepted or dismissed" in refusal, refusal
    c.find("#confirm-cancel").click()

    # Accepting: the dialog shows what will be declared (the declaration's
    # dry run) before Confirm.
    c.click(f"{trig} button.accept")
    c.wait("the dialog opens", lambda: c.visible("#confirm"))
    context = c.text("#confirm-context")
    assert "Evidence: login.failed counted 250" in context and "throttle-high-risk" in context, context
    c.find("#confirm-reason").send_keys("the wave is real")
    c.find("#confirm-preview-button").click()
    c.wait("the declaration's preview", lambda: c.all("#confirm-preview .preview-summary") or c.visible("#confirm-error"))
    assert not c.visible("#confirm-error"), c.text("#confirm-error")
    assert "This will:" in c.text("#confirm-preview"), c.text("#confirm-preview")
    c.shot("15-accept-preview")
    c.find("#confirm-button").click()
    c.wait("the dialog closes", lambda: not c.visible("#confirm") or c.visible("#confirm-error"))
    assert not c.visible("#confirm-error"), c.text("#confirm-error")
    c.wait("the accepted proposal leaves the open list", lambda: not c.all(trig))
    # The incident is declared, says the CLI, its timeline citing the evidence.
    cli = subprocess.run(CLI_INCIDENT, capture_output=True, text=True, timeout=60, env=INSIGHTS_ENV)
    assert cli.returncode == 0, f"{CLI_INCIDENT}: {cli.stderr}"
    shown = json.loads(cli.stdout)
    declared = shown["timeline"][0]
    assert declared["event"] == "declared" and declared["reason"] == "the wave is real", declared
    cited = f"accepted proposal {proposal_id}: login.failed counted 250 in 5m across the fleet, above 200 (ivr 250); "
    assert declared["detail"].startswith(cited), declared
    assert shown["severity"] == "sev3", shown
    incident_id = shown["id"]
    closed = f'tr.closed-proposal[data-proposal-id="{proposal_id}"]'
    c.wait("the accepted proposal is listed closed", lambda: c.all(closed))
    row = c.text(closed)
    assert "accepted at" in row and "commander" in row and "the wave is real" in row and incident_id in row, row
    c.shot("16-proposals-closed")
    # The overview: the incident, its timeline citing the evidence; no open
    # proposal counted.
    c.click("#view-overview")
    incident = f'li.incident[data-incident-id="{incident_id}"]'
    c.wait("the declared incident", lambda: c.all(incident))
    assert cited.strip() in c.text(f"{incident} .timeline"), c.text(incident)
    c.wait("no open proposal counted", lambda: not c.visible("#proposals-badge") and not c.visible("#proposals-banner"))
    c.sign_out()


def insights_partial(c):
    """A replica that does not answer: the insights say they are partial and
    name it, plainly."""
    c.sign_in("viewer", url=SILENT_URL)
    c.click("#view-insights")
    c.wait("the partial insights", lambda: c.visible("#insights-partial"))
    partial = c.text("#insights-partial")
    assert partial.startswith("PARTIAL: some replica did not answer"), partial
    assert "r-b (" in partial and "did not answer" in partial, partial
    replicas = c.text("#insights-replicas")
    assert "r-a (" in replicas and "answered" in replicas, replicas
    assert "r-b (" in replicas and "DID NOT ANSWER" in replicas, replicas
    assert "from 1 of 2 replica(s)" in c.text("#insights-state"), c.text("#insights-state")
    c.shot("17-insights-partial")
    c.sign_out()


def over_https():
    """The console of a server with TLS: served over HTTPS with HTTP/2, in a
    secure context, live."""
    driver = browser(extra=[f"--ignore-certificate-errors-spki-list={TLS_SPKI}"])
    c = Console(driver)
    try:
        c.sign_in("commander", url=TLS_URL)
        protocol = driver.execute_script("return performance.getEntriesByType('navigation')[0].nextHopProtocol;")
        assert protocol == "h2", protocol
        assert driver.execute_script("return window.isSecureContext;"), "not a secure context"
        assert driver.execute_script("return location.protocol;") == "https:"
        status, body = c.forged("ApplyModes", {"modes": ["incident-notice"], "reason": "over HTTPS"})
        assert status == 200, (status, body)
        c.wait("the mode appears over HTTPS", lambda: c.all('tr.activation[data-mode="incident-notice"]'))
        calls = driver.execute_script(
            "return performance.getEntriesByType('resource').filter((e) => e.name.includes('/api/v1/')).map((e) => e.nextHopProtocol);"
        )
        assert calls and all(p == "h2" for p in calls), calls
        c.shot("10-https")
        c.sign_out()
        # Without a tokens file (a loopback name over HTTP/2): the page asks
        # for a name, and its calls pass the host check.
        driver.get(OPEN_TLS_URL)
        c.wait("the name field", lambda: c.visible("#principal"))
        c.wait("the name field has focus", lambda: driver.switch_to.active_element.get_attribute("id") == "principal")
        driver.switch_to.active_element.send_keys("alice", Keys.ENTER)
        c.wait("alice is signed in over HTTPS", lambda: "Signed in as alice (admin)" in c.find("#whoami").text)
        c.wait("the event stream is live over HTTPS", lambda: c.find("#live").text == "Live")
        protocol = driver.execute_script("return performance.getEntriesByType('navigation')[0].nextHopProtocol;")
        assert protocol == "h2", protocol
    finally:
        driver.quit()


def not_live_while_the_store_stalls(c):
    """The store stops answering (etcd paused): the page says it is not
    live, and keeps showing what it read (never "nothing in force"); when the
    store answers again, it is live again."""
    c.sign_in("commander", url=STALL_URL)
    status, body = c.forged("ApplyModes", {"modes": ["incident-notice"], "reason": "before the store stalls"})
    assert status == 200, (status, body)
    c.wait("the mode is shown", lambda: c.all('tr.activation[data-mode="incident-notice"]'))
    os.kill(ETCD_PID, signal.SIGSTOP)
    try:
        c.wait("the page says it is not live", lambda: c.find("#live").text.startswith("Not live"))
        c.shot("11-not-live")
        assert c.all('tr.activation[data-mode="incident-notice"]'), "what was read is no longer shown"
        assert not c.visible("#nothing-active"), "nothing in force, says the page"
    finally:
        os.kill(ETCD_PID, signal.SIGCONT)
    c.wait("the page is live again", lambda: c.find("#live").text == "Live", timeout=60)
    c.sign_out()


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
        seven_tabs(console)
        insights_view(console)
        proposals_view(console)
        insights_partial(console)
        not_live_while_the_store_stalls(console)
        without_tokens(console)
        over_https()
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
