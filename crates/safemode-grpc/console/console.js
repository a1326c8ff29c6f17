// The safemode console: a plain JavaScript module, no framework, no build.
//
// It speaks the control service transcoded (POST /api/v1/<Method>, protobuf
// JSON) with the signed-in caller's bearer token in the Authorization header
// (kept in sessionStorage, never in a URL or a cookie), and follows
// GET /api/v1/events with fetch() so that the header goes along. What a role
// may not do is not offered (WhoAmI says, from the server's one permission
// table); the server refuses it anyway. Every text from the server is set with
// textContent: nothing it sends is ever parsed as HTML.
//
// One event stream per browser, not per tab: the tabs signed in alike on one
// namespace elect a leader (navigator.locks) that holds the stream and passes
// its events on (BroadcastChannel); when it closes, another takes over. Every
// call has a deadline, and the page says "Not live" when a refresh has not
// finished within a few seconds.
//
// Three views: the overview (what is in force), insights (what the channels'
// reports and the policy show an attacker: the inconsistency map, soft
// downtime, dead ends, signals), and the early-warning proposals, whose open
// count the navigation and the overview show.

const CHANNELS = ["chatbot", "ivr", "agent-desk", "web", "mobile", "email"];
const METHODS = ["password", "sms_otp", "email_otp", "voice_otp", "totp", "push", "webauthn", "id_document", "kba", "callback"];
const ACTIONS = ["account.password_reset", "account.email_change", "account.phone_change", "account.mfa_reset", "account.recovery", "payment.refund", "payment.payout", "order.view", "balance.view", "contact.intake", "handoff.ai_to_human"];
const STATES = [
  ["synced", "SYNCED"],
  ["stale", "STALE"],
  ["notAcked", "NOT_ACKED"],
  ["rejected", "REJECTED"],
];
const TOKEN_KEY = "safemode.token";
/// How long one API call may take before the page gives up on it.
const CALL_DEADLINE_MS = 10000;
/// How long a refresh may run before the page says it is not live.
const NOT_LIVE_AFTER_MS = 4000;
/// How long the event stream may say nothing (it says something every 15 s).
const STREAM_SILENCE_MS = 40000;
const PRINCIPAL_KEY = "safemode.principal";
/// How often the insights view reads again while it is open (a fleet
/// gather: modest), besides whenever the namespace's revision moves.
const INSIGHTS_EVERY_MS = 15000;
/// The views, by name: the element that holds each.
const VIEWS = { overview: "overview-view", insights: "insights-view", proposals: "proposals-view" };

const $ = (id) => document.getElementById(id);

// === Elements, text only ===

/// An element with text set as text and attributes from `attrs`.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function show(node, visible) {
  node.hidden = !visible;
}

function when(timestamp) {
  if (!timestamp) return "";
  const date = new Date(timestamp);
  return Number.isNaN(date.getTime()) ? String(timestamp) : date.toISOString().replace(".000Z", "Z");
}

function say(text) {
  const notice = $("notice");
  notice.textContent = text;
  show(notice, Boolean(text));
}

function fail(text) {
  const error = $("error");
  error.textContent = text;
  show(error, Boolean(text));
}

// === The API ===

const session = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  principal: sessionStorage.getItem(PRINCIPAL_KEY) || "",
  // When the namespace was last read (null: not since it was chosen).
  readAt: null,
  who: null,
  may: { read: false, readAudit: false, change: false, approve: false },
  namespace: "live",
  runbooks: [],
  modes: [],
  stream: null,
  // The namespace's revision as last known (a string; null: not read yet),
  // and what to do when it moves (outdated previews).
  revision: null,
  onRevision: new Set(),
  problems: [],
  fleetPartial: false,
  fleetProblems: [],
  // The view shown: overview, insights or proposals.
  view: "overview",
  // The namespace's open proposals as last read.
  proposals: [],
};

function credentials() {
  const headers = {};
  if (session.token) headers["Authorization"] = `Bearer ${session.token}`;
  else if (session.principal) headers["x-safemode-principal"] = session.principal;
  return headers;
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function call(method, request = {}) {
  const deadline = new AbortController();
  const timer = setTimeout(() => deadline.abort(), CALL_DEADLINE_MS);
  let answer;
  let body = null;
  try {
    answer = await fetch(`/api/v1/${method}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...credentials() },
      body: JSON.stringify(request),
      credentials: "omit",
      cache: "no-store",
      signal: deadline.signal,
    });
    try {
      body = await answer.json();
    } catch {
      body = null;
    }
  } catch (error) {
    if (deadline.signal.aborted) {
      throw new ApiError(0, "deadline_exceeded", `${method}: no answer within ${CALL_DEADLINE_MS / 1000} s`);
    }
    throw new ApiError(0, "network", `${method}: ${error.message}`);
  } finally {
    clearTimeout(timer);
  }
  if (!answer.ok) {
    const message = body && body.message ? body.message : `HTTP ${answer.status}`;
    throw new ApiError(answer.status, body && body.code ? body.code : "http", message);
  }
  return body;
}

// === Signing in ===

async function start() {
  wireForms();
  fillStaticChoices();
  try {
    await signIn();
  } catch (error) {
    showSignIn(error);
  }
}

async function signIn() {
  const who = await call("WhoAmI", { namespaces: [session.namespace] });
  if (!who.tokens && !session.principal && !session.token) {
    // A server without tokens admits anyone on loopback: ask for a name,
    // as the CLI's --principal.
    showSignIn(null, false);
    return;
  }
  session.who = who;
  session.may = who.permissions[0];
  fail("");
  show($("signin"), false);
  show($("main"), true);
  show($("namespace-form"), true);
  show($("signout"), true);
  show($("views"), true);
  $("whoami").textContent = `Signed in as ${who.principal} (${who.roles.join(", ") || "no role"})`;
  applyPermissions();
  await loadCatalog();
  await refresh();
  follow();
}

function showSignIn(error, tokens = true) {
  session.who = null;
  session.readAt = null;
  drawn.clear();
  stopFollowing();
  show($("signin"), true);
  show($("main"), false);
  show($("namespace-form"), false);
  show($("signout"), false);
  show($("views"), false);
  showView("overview", false);
  clearInsights();
  $("whoami").textContent = "";
  $("revision").textContent = "";
  session.revision = null;
  setStream("");
  const withTokens = tokens;
  show($("token-row"), withTokens);
  show($("principal-row"), !withTokens);
  $("signin-hint").textContent = withTokens
    ? "This server checks tokens: paste yours (an admin makes one with `safemode token create`). It is kept in this tab only."
    : "This server has no tokens file: give the name your changes are recorded under (as the CLI's --principal).";
  if (error) {
    fail(error instanceof ApiError && error.status === 401 && !session.token ? "" : error.message);
  }
  (withTokens ? $("token") : $("principal")).focus();
}

function signOut(message = "") {
  session.token = "";
  session.principal = "";
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(PRINCIPAL_KEY);
  showSignIn(null, true);
  fail(message);
  say("");
  // Find out again whether the server wants a token.
  call("WhoAmI", {}).then(
    (who) => showSignIn(null, who.tokens),
    () => showSignIn(null, true),
  );
}

function applyPermissions() {
  show($("actions-section"), session.may.change);
  show($("audit-section"), session.may.readAudit);
}

// === The catalogue and the fixed choices ===

function fillStaticChoices() {
  for (const channel of CHANNELS) {
    $("decide-channel").append(el("option", { value: channel, text: channel }));
    $("apply-channels").append(
      el("label", {}, el("input", { type: "checkbox", name: "channel", value: channel }), ` ${channel}`),
    );
  }
  for (const action of ACTIONS) $("actions-list").append(el("option", { value: action }));
  for (const method of METHODS) {
    $("decide-methods").append(
      el("label", {}, el("input", { type: "checkbox", name: "method", value: method }), ` ${method}`),
    );
  }
}

async function loadCatalog() {
  const [runbooks, modes] = await Promise.all([call("ListRunbooks"), call("ListModes")]);
  session.runbooks = runbooks.runbooks;
  session.modes = modes.modes;
  const runbook = $("declare-runbook");
  runbook.replaceChildren(
    ...session.runbooks.map((r) => el("option", { value: r.name, text: `${r.name}: ${r.title}` })),
  );
  fillSeverities();
  const boxes = $("apply-modes");
  boxes.replaceChildren(boxes.firstElementChild);
  for (const mode of session.modes) {
    boxes.append(
      el("label", { title: mode.summary }, el("input", { type: "checkbox", name: "mode", value: mode.name }), ` ${mode.name}`),
    );
  }
}

function selectedRunbook() {
  return session.runbooks.find((r) => r.name === $("declare-runbook").value);
}

function fillSeverities() {
  const runbook = selectedRunbook();
  const severity = $("declare-severity");
  severity.replaceChildren(
    ...(runbook ? runbook.stages.map((s) => el("option", { value: s.severity, text: s.severity })) : []),
  );
  showStage();
}

/// What the chosen stage will do: its modes, customer message and agent script.
function stageDetails(runbook, severity) {
  const stage = runbook && runbook.stages.find((s) => s.severity === severity);
  if (!stage) return el("p", { text: "Choose an incident type and a severity." });
  const modeTexts = (field) =>
    stage.modes
      .map((name) => session.modes.find((m) => m.name === name.split(" on ")[0]))
      .filter((m) => m && m[field])
      .map((m) => `${m.name}: ${m[field]}`)
      .join("\n");
  return el(
    "dl",
    { class: "stage" },
    el("dt", { text: "Summary" }),
    el("dd", { text: runbook.summary }),
    el("dt", { text: `Modes at ${stage.severity}` }),
    el("dd", { text: stage.modes.join(", ") }),
    el("dt", { text: "Customers are told" }),
    el("dd", { class: "customer-message", text: stage.customerMessage || modeTexts("customerNotice") || "(nothing new)" }),
    el("dt", { text: "Agents are told" }),
    el("dd", { class: "agent-script", text: stage.agentScript || modeTexts("agentScript") || "(nothing new)" }),
    el("dt", { text: "Lifting needs a second approver" }),
    el("dd", { text: runbook.liftRequiresApproval ? "yes" : "no" }),
  );
}

function showStage() {
  $("declare-stage").replaceChildren(stageDetails(selectedRunbook(), $("declare-severity").value));
}

// === What is in force ===

const drawn = new Map();

/// Runs `render` when `data` differs from what the section was last drawn
/// from. The focused element and every half-made choice (a select with a
/// `data-key`) are found again by their key in what was drawn anew, so a
/// keyboard user keeps their place through live updates.
function rerender(section, data, render) {
  const key = JSON.stringify(data);
  if (drawn.get(section) === key) return;
  drawn.set(section, key);
  const focused = document.activeElement;
  const focusKey = focused && focused.dataset ? focused.dataset.key : undefined;
  const chosen = new Map([...document.querySelectorAll("select[data-key]")].map((s) => [s.dataset.key, s.value]));
  render();
  for (const [choice, value] of chosen) {
    const select = document.querySelector(`select[data-key="${CSS.escape(choice)}"]`);
    if (select && [...select.options].some((o) => o.value === value)) select.value = value;
  }
  if (focusKey && !document.contains(focused)) {
    const again = document.querySelector(`[data-key="${CSS.escape(focusKey)}"]`);
    if (again) again.focus();
  }
}

// === Whether the page is live ===

const liveness = {
  // What the event stream says ("Live", "Reconnecting…", "Not live: …").
  stream: "",
  // When the refresh under way started (null: none is).
  refreshSince: null,
};

function showLive() {
  let text = liveness.stream;
  if (liveness.refreshSince !== null) {
    const waited = Date.now() - liveness.refreshSince;
    if (waited >= NOT_LIVE_AFTER_MS) text = `Not live: the last refresh has not finished for ${Math.round(waited / 1000)} s`;
  }
  const live = $("live");
  if (live.textContent !== text) live.textContent = text;
}

function setStream(text) {
  liveness.stream = text;
  showLive();
}

setInterval(showLive, 1000);

let refreshing = null;
let refreshAgain = false;

/// Reads what the page shows of the namespace, once at a time (a change
/// during a refresh refreshes again after it), and the fleet's propagation
/// beside it (never waited for: a replica that does not answer must not
/// hold the namespace back).
async function refresh() {
  refreshFleet();
  if (refreshing) {
    refreshAgain = true;
    return refreshing;
  }
  refreshing = (async () => {
    do {
      refreshAgain = false;
      if (liveness.refreshSince === null) liveness.refreshSince = Date.now();
      try {
        await readAndRender();
      } catch (error) {
        if (error instanceof ApiError && error.status === 401) {
          signOut(error.message);
          return;
        }
        if (session.readAt) {
          // What is shown is what was read last: say so, and when.
          fail(`${error.message} (showing what was read at ${session.readAt.toLocaleTimeString()})`);
        } else {
          // Nothing was read: an empty page would say "nothing in force".
          show($("main"), false);
          fail(`Cannot read namespace ${session.namespace}: ${error.message}. Nothing is shown until it can be read.`);
        }
      }
    } while (refreshAgain);
  })();
  try {
    await refreshing;
  } finally {
    refreshing = null;
    liveness.refreshSince = null;
    showLive();
  }
}

/// The namespace as the replica answering has it: its revision, what is in
/// force, incidents, requests and proposals (no other replica is asked: at
/// once).
async function readAndRender() {
  const namespace = session.namespace;
  // The closed proposals only while their view is open.
  const closedWanted = session.view === "proposals";
  const [status, incidents, requests, proposals, all] = await Promise.all([
    call("GetStatus", { namespace, pageSize: 1, thisReplicaOnly: true }),
    call("ListIncidents", { namespace, includeResolved: true }),
    call("ListRequests", { namespace }),
    call("ListProposals", { namespace }),
    closedWanted ? call("ListProposals", { namespace, includeClosed: true }) : null,
  ]);
  if (namespace !== session.namespace) return;
  session.readAt = new Date();
  show($("main"), true);
  fail("");
  if (status.store && !status.store.reachable) {
    fail(`The store (${status.store.kind}) is unreachable: ${status.store.error || "no answer"}. This shows what replica ${status.replica} last read, and no change can be made until the store is back.`);
  }
  $("revision").textContent = `${status.namespace} at revision ${status.revision}`;
  namespaceAt(status.revision);
  const active = incidents.incidents.filter((i) => i.status === "active");
  const pending = requests.requests.filter((r) => r.status === "pending");
  // Only what changed is drawn again, so that focus and a half-made choice
  // elsewhere on the page survive a live update.
  const who = [session.who && session.who.principal, session.may];
  rerender("incidents", [active, who, session.runbooks.length], () => renderIncidents(active));
  rerender("activations", [status.activations, who], () => renderActivations(status.activations));
  rerender("told", status.activations, () => renderTold(status.activations));
  rerender("requests", [pending, who], () => renderRequests(pending));
  rerender("audit-choices", incidents.incidents, () => renderAuditChoices(incidents.incidents));
  session.proposals = (proposals.proposals || []).filter((p) => p.state === "open");
  rerender("proposals", [session.proposals, who, session.runbooks.length], () => renderProposals(session.proposals));
  showProposalCount(session.proposals);
  if (all) {
    const closed = (all.proposals || []).filter((p) => p.state !== "open");
    rerender("closed-proposals", closed, () => renderClosedProposals(closed));
  }
  show($("nothing-active"), active.length === 0 && status.activations.length === 0);
  session.problems = status.problems || [];
  showProblems();
}

/// The namespace's problems and the fleet's, in one line.
function showProblems() {
  const partial = $("partial");
  partial.textContent = [
    session.fleetPartial ? "Partial: some replicas did not answer, their subscribers are missing below." : "",
    ...[...new Set([...(session.problems || []), ...(session.fleetProblems || [])])].map((p) => `Problem: ${p}`),
  ]
    .filter(Boolean)
    .join(" ");
  show(partial, Boolean(partial.textContent));
}

/// The namespace's revision as last read or said by the stream: a newer one
/// makes what was previewed outdated.
function namespaceAt(revision) {
  const now = String(revision);
  if (session.revision === now) return;
  const before = session.revision;
  session.revision = now;
  if (before !== null) {
    for (const moved of [...session.onRevision]) moved(before, now);
  }
}

let fleetReading = null;
let fleetAgain = false;

/// The fleet's propagation: one gather (the summary counts every state; the
/// page lists the rejected), on its own, drawn when it answers; a replica
/// that does not answer within its deadline is named, the answer partial.
/// Tabs sharing a stream share the gather too: the leading tab reads and
/// passes the answer on, so seven tabs cost the fleet one gather, not seven.
async function refreshFleet() {
  if (session.channel && !session.leading) {
    session.channel.postMessage({ kind: "fleet?" });
    return;
  }
  if (fleetReading) {
    fleetAgain = true;
    return fleetReading;
  }
  fleetReading = (async () => {
    do {
      fleetAgain = false;
      const namespace = session.namespace;
      const gathering = setTimeout(() => {
        $("propagation-state").textContent = "Gathering the fleet's propagation…";
      }, 1000);
      try {
        const status = await call("GetStatus", { namespace, state: "REJECTED", pageSize: 100 });
        if (session.channel && session.leading) session.channel.postMessage({ kind: "fleet", namespace, status });
        drawFleet(namespace, status);
      } catch (error) {
        if (session.channel && session.leading) session.channel.postMessage({ kind: "fleet", namespace, error: error.message });
        fleetFailed(namespace, error.message);
      } finally {
        clearTimeout(gathering);
      }
    } while (fleetAgain);
  })();
  try {
    await fleetReading;
  } finally {
    fleetReading = null;
  }
}

function renderIncidents(incidents) {
  show($("incidents-empty"), incidents.length === 0);
  $("incidents").replaceChildren(
    ...incidents.map((incident) => {
      const runbook = session.runbooks.find((r) => r.name === incident.type);
      const card = el(
        "li",
        { class: "incident", "data-incident-id": incident.id },
        el("h3", { text: `${incident.title || incident.type} — ${incident.severity.toUpperCase()}` }),
        el(
          "p",
          {},
          `Type ${incident.type}, severity ${incident.severity}, stage: `,
          el("span", { class: "stage-modes", text: (incident.activations || []).map((a) => a.mode).join(", ") || "(none)" }),
          `. Declared by ${incident.declaredBy} at ${when(incident.declaredAt)}. Id ${incident.id}.`,
        ),
        el(
          "ol",
          { class: "timeline", "aria-label": "Timeline" },
          ...incident.timeline.map((event) =>
            el("li", {
              text: `${when(event.at)} ${event.event}${event.severity ? ` (${event.severity})` : ""} by ${event.principal}: ${event.reason}${event.detail ? ` — ${event.detail}` : ""}`,
            }),
          ),
        ),
      );
      if (session.may.change) {
        const severities = runbook ? runbook.stages.map((s) => s.severity).filter((s) => s !== incident.severity) : [];
        if (severities.length > 0) {
          const select = el(
            "select",
            { class: "escalate-severity", "data-key": `escalate-severity:${incident.id}`, "aria-label": `New severity for ${incident.id}` },
            ...severities.map((s) => el("option", { value: s, text: s })),
          );
          const escalate = el("button", { type: "button", class: "escalate", "data-key": `escalate:${incident.id}`, text: "Change severity…" });
          escalate.addEventListener("click", () => askEscalate(incident, select.value));
          card.append(el("p", {}, select, " ", escalate));
        }
        const resolve = el("button", { type: "button", class: "resolve danger", "data-key": `resolve:${incident.id}`, text: "Resolve…" });
        resolve.addEventListener("click", () => askResolve(incident));
        card.append(el("p", {}, resolve));
      }
      return card;
    }),
  );
}

function channelsText(channels) {
  return channels && channels.length > 0 ? channels.join(", ") : "every channel";
}

function renderActivations(activations) {
  show($("activations-empty"), activations.length === 0);
  show($("activations-table"), activations.length > 0);
  $("activations").replaceChildren(
    ...activations.map((activation) => {
      const actions = el("td");
      if (session.may.change) {
        const lift = el("button", { type: "button", class: "lift", "data-key": `lift:${activation.id}`, text: "Lift…" });
        lift.addEventListener("click", () => askLift(activation));
        actions.append(lift);
      }
      return el(
        "tr",
        { class: "activation", "data-mode": activation.mode, "data-activation-id": activation.id },
        el("td", { text: `${activation.mode} (${activation.id})` }),
        el("td", { text: channelsText(activation.channels) }),
        el("td", { text: activation.principal }),
        el("td", { class: "text reason", text: activation.reason }),
        el("td", { text: when(activation.appliedAt) }),
        el("td", { text: activation.incidentId || "—" }),
        actions,
      );
    }),
  );
}

function renderPropagation(status) {
  // The page's subscribers are the rejected ones (the newest 100); the
  // summary counts every state.
  const rejected = status.subscribers;
  const rejectedCount = Number(status.subscriberCount || 0);
  const replicas = status.replicas || [];
  const answered = replicas.filter((r) => r.answered).length;
  const total = status.channels.reduce((n, summary) => n + STATES.reduce((m, [field]) => m + Number(summary[field] || 0), 0), 0);
  $("propagation-summary").textContent =
    `${total} subscriber(s) on ${answered} of ${replicas.length} replica(s); the namespace is at revision ${status.revision}.` +
    (status.channels.length === 0 ? " No subscriber is connected." : "");
  $("propagation").replaceChildren(
    ...status.channels.map((summary) => {
      const total = STATES.reduce((n, [field]) => n + Number(summary[field] || 0), 0);
      const bar = el("div", { class: "bar", role: "img", "aria-label": countsText(summary, total) });
      for (const [field, name] of STATES) {
        const count = Number(summary[field] || 0);
        if (count === 0) continue;
        const part = el("span", { class: cssState(name), title: `${count} ${name}` });
        // CSSOM, not a style attribute: allowed by the page's policy.
        part.style.flexGrow = String(count);
        bar.append(part);
      }
      return el(
        "li",
        { class: "channel-bar", "data-channel": summary.channel },
        el("strong", { text: summary.channel }),
        bar,
        el("span", { class: "counts", text: countsText(summary, total) }),
      );
    }),
  );
  show($("rejected-empty"), rejected.length === 0);
  const more = rejectedCount - rejected.length;
  $("rejected").replaceChildren(
    ...rejected.map((s) =>
      el("li", {
        class: "state-rejected",
        text: `REJECTED: ${s.subscriberId} (${s.channel}, on ${s.replica}) rejected revision ${s.rejectedRevision}: ${s.rejectReason}`,
      }),
    ),
    ...(more > 0 ? [el("li", { text: `… and ${more} more: safemode status --state rejected lists them all` })] : []),
  );
  $("replicas").replaceChildren(
    ...replicas.map((r) =>
      r.answered
        ? el("li", {
            class: "replica",
            text: `${r.replica} (${r.address}): answered; applied revision ${r.appliedRevision}; ${r.subscriberCount} subscriber(s)`,
          })
        : el("li", {
            class: "replica state-rejected",
            text: `${r.replica} (${r.address}): DID NOT ANSWER — ${r.error}`,
          }),
    ),
  );
}

function cssState(name) {
  return name.toLowerCase().replace("_", "-");
}

function countsText(summary, total) {
  const parts = STATES.map(([field, name]) => `${Number(summary[field] || 0)} ${name}`);
  return `${summary.synced} of ${total} SYNCED — ${parts.join(", ")}`;
}

/// The distinct texts of `field` among `activations`, each with the modes
/// that say it (a stage gives all its modes one text).
function byText(activations, field) {
  const texts = new Map();
  for (const activation of activations) {
    const text = activation[field];
    if (!text) continue;
    if (!texts.has(text)) texts.set(text, []);
    texts.get(text).push(activation.mode);
  }
  return [...texts.entries()];
}

function renderTold(activations) {
  // Channels told the same are shown once, together.
  const groups = new Map();
  for (const channel of CHANNELS) {
    const covering = activations.filter((a) => !a.channels || a.channels.length === 0 || a.channels.includes(channel));
    const notices = byText(covering, "customerNotice");
    const scripts = byText(covering, "agentScript");
    if (notices.length === 0 && scripts.length === 0) continue;
    const key = JSON.stringify([notices, scripts]);
    if (!groups.has(key)) groups.set(key, { channels: [], notices, scripts });
    groups.get(key).channels.push(channel);
  }
  const list = (texts) =>
    texts.length > 0
      ? el("ul", {}, ...texts.map(([text, modes]) => el("li", { class: "text", text: `${text} (${modes.join(", ")})` })))
      : el("p", { class: "empty", text: "nothing new" });
  const cards = [...groups.values()].map((group) =>
    el(
      "li",
      { class: "told", "data-channels": group.channels.join(" ") },
      el("h3", { text: group.channels.length === CHANNELS.length ? "Every channel" : group.channels.join(", ") }),
      el("h4", { text: "Customers are told" }),
      list(group.notices),
      el("h4", { text: "Agents are told" }),
      list(group.scripts),
    ),
  );
  show($("told-empty"), cards.length === 0);
  $("told").replaceChildren(...cards);
}

function renderRequests(requests) {
  show($("requests-empty"), requests.length === 0);
  $("requests").replaceChildren(
    ...requests.map((request) => {
      const own = session.who && request.requestedBy === session.who.principal;
      const card = el(
        "li",
        { class: "request", "data-request-id": request.id },
        el("h3", { text: `${request.kind} ${request.incidentId || ""} — waiting for a second approver` }),
        el("p", { class: "summary", text: `Approving it will: ${request.summary}` }),
        el("p", {
          text: `Asked by ${request.requestedBy} at ${when(request.requestedAt)}: ${request.reason}. Expires ${when(request.expiresAt)}. Id ${request.id}.`,
        }),
      );
      const buttons = el("p");
      if (session.may.approve && !own) {
        const approve = el("button", { type: "button", class: "approve", "data-key": `approve:${request.id}`, text: "Approve…" });
        approve.addEventListener("click", () => askApprove(request));
        buttons.append(approve, " ");
      }
      if (own) buttons.append(el("span", { class: "own", text: "Your request: another person must approve it. " }));
      if (session.may.change) {
        const withdraw = el("button", { type: "button", class: "withdraw", "data-key": `withdraw:${request.id}`, text: "Withdraw…" });
        withdraw.addEventListener("click", () => askWithdraw(request));
        buttons.append(withdraw);
      }
      card.append(buttons);
      return card;
    }),
  );
}

// === Asking before acting ===

/// Opens the confirmation dialog: a reason, then (where the call has a dry
/// run) the preview of exactly what will change, then Confirm.
/// A new change id: a confirmation pressed again after a failed or lost
/// answer sends the same one, so the change commits at most once.
function newChangeId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return `console-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function confirmAction({ title, context, preview, commit }) {
  const dialog = $("confirm");
  session.changeId = newChangeId();
  $("confirm-title").textContent = title;
  $("confirm-context").replaceChildren(...context);
  const reason = $("confirm-reason");
  reason.value = "";
  reason.readOnly = false;
  $("confirm-preview").replaceChildren();
  const error = $("confirm-error");
  show(error, false);
  const previewButton = $("confirm-preview-button");
  const confirmButton = $("confirm-button");
  show(previewButton, Boolean(preview));
  confirmButton.disabled = Boolean(preview);
  const problem = (text) => {
    error.textContent = text;
    show(error, Boolean(text));
  };
  const needReason = () => {
    if (reason.value.trim() === "") {
      problem("Give a reason: it is recorded with the change.");
      reason.focus();
      return false;
    }
    return true;
  };
  // A preview is of the namespace at one revision: when it moves, Confirm
  // waits for a new preview.
  let previewedAt = null;
  const outdated = (before, now) => {
    if (previewedAt === null || !dialog.open) return;
    previewedAt = null;
    confirmButton.disabled = true;
    $("confirm-preview").prepend(
      el("p", {
        class: "warning outdated",
        role: "alert",
        text: `Outdated: the namespace moved from revision ${before} to ${now} since this preview. Preview again to see what Confirm will do now.`,
      }),
    );
    previewButton.focus();
  };
  session.onRevision.add(outdated);
  dialog.addEventListener("close", () => session.onRevision.delete(outdated), { once: true });
  previewButton.onclick = async () => {
    if (!needReason()) return;
    problem("");
    try {
      const at = session.revision;
      const answer = await preview(reason.value);
      $("confirm-preview").replaceChildren(previewView(answer.preview), ...deadEndsView(answer.deadEnds));
      reason.readOnly = true;
      previewedAt = at;
      confirmButton.disabled = false;
      confirmButton.focus();
      // The namespace may have moved while the preview was made.
      if (session.revision !== at) outdated(at, session.revision);
    } catch (e) {
      problem(e.message);
    }
  };
  confirmButton.onclick = async () => {
    if (!needReason()) return;
    problem("");
    confirmButton.disabled = true;
    try {
      const message = await commit(reason.value);
      dialog.close();
      say(message);
      await refresh();
    } catch (e) {
      problem(e.message);
      confirmButton.disabled = false;
    }
  };
  $("confirm-cancel").onclick = () => dialog.close();
  dialog.showModal();
  reason.focus();
}

/// A dry run's preview: what changes, whether it waits for approval, and
/// each channel's effects before and after.
function previewView(preview) {
  if (!preview) return el("p", { text: "The server said nothing about what would change." });
  const box = el("div", { class: "preview" });
  box.append(el("p", { class: "preview-summary", text: preview.summary ? `This will: ${preview.summary}` : "This changes nothing." }));
  if (preview.needsApproval) {
    box.append(
      el("p", {
        class: "warning",
        text: `It will wait for a second approver (${(preview.approverRoles || []).join(" or ")}), not ${preview.notApprover}. Approving it will: ${preview.approvalSummary}`,
      }),
    );
  }
  if (preview.channels && preview.channels.length > 0) {
    const rows = [];
    for (const channel of preview.channels) {
      for (const effect of channel.effects) {
        rows.push(
          el(
            "tr",
            {},
            el("td", { text: channel.channel }),
            el("td", { text: effect.action }),
            el("td", { text: effect.before }),
            el("td", { text: effect.after }),
            el("td", { class: "text", text: effect.customerMessageAfter }),
            el("td", { class: "text", text: effect.agentScriptAfter }),
          ),
        );
      }
    }
    box.append(
      el(
        "table",
        {},
        el("caption", { text: "Effects that change, per channel" }),
        el(
          "thead",
          {},
          el(
            "tr",
            {},
            ...["Channel", "Action", "Before", "After", "Customers are told", "Agents are told"].map((h) => el("th", { scope: "col", text: h })),
          ),
        ),
        el("tbody", {}, ...rows),
      ),
    );
  }
  return box;
}

/// The dead ends a change would leave (a declaration's), if any.
function deadEndsView(deadEnds) {
  if (!deadEnds || deadEnds.length === 0) return [];
  return [
    el("p", { class: "warning", text: "It leaves dead ends: actions no customer can get done on any channel:" }),
    el("ul", { class: "dead-ends" }, ...deadEnds.map((line) => el("li", { class: "text", text: line }))),
  ];
}

function outcome(answer, done) {
  if (answer.pending) return `Waiting for a second approver: request ${answer.pending.id} (${answer.pending.summary}).`;
  return done;
}

function askDeclare() {
  const runbook = selectedRunbook();
  const severity = $("declare-severity").value;
  if (!runbook || !severity) return;
  const request = (reason, dryRun) => ({
    namespace: session.namespace,
    type: runbook.name,
    severity,
    reason,
    dryRun,
    changeId: dryRun ? "" : session.changeId,
  });
  confirmAction({
    title: `Declare ${runbook.name} at ${severity}`,
    context: [stageDetails(runbook, severity)],
    preview: (reason) => call("DeclareIncident", request(reason, true)),
    commit: async (reason) => {
      const answer = await call("DeclareIncident", request(reason, false));
      return outcome(answer, `Declared ${answer.incident.id} at revision ${answer.revision}.`);
    },
  });
}

function askApply() {
  const modes = [...document.querySelectorAll("#apply-modes input:checked")].map((i) => i.value);
  const channels = [...document.querySelectorAll("#apply-channels input:checked")].map((i) => i.value);
  if (modes.length === 0) {
    fail("Tick at least one mode to apply.");
    return;
  }
  fail("");
  const request = (reason, dryRun) => ({ namespace: session.namespace, modes, channels, reason, dryRun, changeId: dryRun ? "" : session.changeId });
  confirmAction({
    title: `Apply ${modes.join(", ")} on ${channelsText(channels)}`,
    context: [],
    preview: (reason) => call("ApplyModes", request(reason, true)),
    commit: async (reason) => {
      const answer = await call("ApplyModes", request(reason, false));
      return `Applied at revision ${answer.revision}.`;
    },
  });
}

function askLift(activation) {
  const request = (reason, dryRun) => ({
    namespace: session.namespace,
    targets: [activation.id],
    reason,
    dryRun,
    changeId: dryRun ? "" : session.changeId,
    incidentOk: Boolean(activation.incidentId),
  });
  confirmAction({
    title: `Lift ${activation.mode} (${activation.id})`,
    context: activation.incidentId
      ? [el("p", { class: "warning", text: `It belongs to incident ${activation.incidentId}: lifting it outside the incident goes on the incident's timeline.` })]
      : [],
    preview: (reason) => call("LiftActivations", request(reason, true)),
    commit: async (reason) => {
      const answer = await call("LiftActivations", request(reason, false));
      return outcome(answer, `Lifted at revision ${answer.revision}.`);
    },
  });
}

function askEscalate(incident, severity) {
  const request = (reason, dryRun) => ({ incidentId: incident.id, severity, reason, dryRun, changeId: dryRun ? "" : session.changeId });
  const runbook = session.runbooks.find((r) => r.name === incident.type);
  confirmAction({
    title: `Move ${incident.id} from ${incident.severity} to ${severity}`,
    context: [stageDetails(runbook, severity)],
    preview: (reason) => call("EscalateIncident", request(reason, true)),
    commit: async (reason) => {
      const answer = await call("EscalateIncident", request(reason, false));
      return outcome(answer, `${incident.id} is at ${severity} (revision ${answer.revision}).`);
    },
  });
}

function askResolve(incident) {
  const request = (reason, dryRun) => ({ incidentId: incident.id, reason, dryRun, changeId: dryRun ? "" : session.changeId });
  confirmAction({
    title: `Resolve ${incident.id} (${incident.type})`,
    context: [el("p", { text: `Exit criteria: ${(incident.exitCriteria || []).join(" ") || "none written"}` })],
    preview: (reason) => call("ResolveIncident", request(reason, true)),
    commit: async (reason) => {
      const answer = await call("ResolveIncident", request(reason, false));
      return outcome(answer, `Resolved ${incident.id} at revision ${answer.revision}.`);
    },
  });
}

function askApprove(request) {
  confirmAction({
    title: `Approve ${request.id}`,
    context: [
      el("p", { class: "summary", text: `Approving it will: ${request.summary}` }),
      el("p", { text: `Asked by ${request.requestedBy}: ${request.reason}` }),
    ],
    preview: (reason) => call("Approve", { requestId: request.id, reason, dryRun: true }),
    commit: async (reason) => {
      const answer = await call("Approve", { requestId: request.id, reason, changeId: session.changeId });
      return `Approved ${request.id}: done at revision ${answer.revision}.`;
    },
  });
}

function askWithdraw(request) {
  confirmAction({
    title: `Withdraw ${request.id}`,
    context: [el("p", { text: `Nobody will be able to approve it: ${request.summary}` })],
    preview: null,
    commit: async (reason) => {
      await call("Withdraw", { requestId: request.id, reason, changeId: session.changeId });
      return `Withdrew ${request.id}.`;
    },
  });
}

// === Views ===

/// Shows the view `name` (overview, insights or proposals). `read`: read
/// what the view needs now (the insights; the closed proposals).
function showView(name, read = true) {
  session.view = name;
  for (const [view, id] of Object.entries(VIEWS)) show($(id), view === name);
  for (const button of document.querySelectorAll("#views button")) {
    if (button.dataset.view === name) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  if (name === "insights") {
    if (read) readInsights();
  } else {
    stopInsights();
  }
  if (name === "proposals" && read) refresh();
}

// === Early-warning proposals ===

/// The open proposals' count, in the navigation and on the overview.
function showProposalCount(open) {
  const badge = $("proposals-badge");
  badge.textContent = `${open.length} open`;
  show(badge, open.length > 0);
  const banner = $("proposals-banner");
  show(banner, open.length > 0);
  if (open.length > 0) {
    const newest = open[0];
    $("proposals-banner-text").textContent =
      open.length === 1
        ? `1 open proposal: ${newest.question} (${newest.evidence})`
        : `${open.length} open proposals; the newest: ${newest.question} (${newest.evidence})`;
  }
}

/// A window of seconds as the runbooks write it (5m, 90s).
function windowText(seconds) {
  const n = Number(seconds || 0);
  return n >= 60 && n % 60 === 0 ? `${n / 60}m` : `${n}s`;
}

/// What a proposal rests on, as terms and their descriptions.
function proposalDetails(proposal) {
  const runbook = session.runbooks.find((r) => r.name === proposal.type);
  const items = [
    ["Proposes", `declaring ${proposal.type}${runbook ? ` (${runbook.title})` : ""} at ${proposal.severity}`],
  ];
  if (proposal.source === "trigger") {
    items.push(
      ["Signal", proposal.signal],
      ["Count", `${proposal.count} across the fleet, above ${proposal.above}`],
      ["Window", windowText(proposal.withinSeconds)],
      ["Channels", (proposal.channels || []).map((c) => `${c.channel} ${c.count}`).join(", ") || "(none named)"],
    );
  }
  if (proposal.summary) items.push(["The detector saw", proposal.summary]);
  items.push(["Raised", `by ${proposal.raisedBy} at ${when(proposal.raisedAt)}`]);
  return el("dl", { class: "stage" }, ...items.flatMap(([term, text]) => [el("dt", { text: term }), el("dd", { text })]));
}

function renderProposals(open) {
  show($("proposals-empty"), open.length === 0);
  $("proposals").replaceChildren(
    ...open.map((proposal) => {
      const runbook = session.runbooks.find((r) => r.name === proposal.type);
      const card = el(
        "li",
        { class: "proposal", "data-proposal-id": proposal.id },
        el("h3", { text: `${proposal.question} (${proposal.id})` }),
        el("p", { class: "evidence", text: `Evidence: ${proposal.evidence}` }),
        proposal.partial
          ? el("p", { class: "warning", text: "Some replica did not answer when it was raised: the count may be low." })
          : null,
        proposalDetails(proposal),
        el(
          "details",
          { class: "proposed-stage" },
          el("summary", { text: `What ${proposal.type} at ${proposal.severity} does` }),
          stageDetails(runbook, proposal.severity),
        ),
      );
      if (session.may.change) {
        const accept = el("button", { type: "button", class: "accept", "data-key": `accept:${proposal.id}`, text: "Accept and declare…" });
        accept.addEventListener("click", () => askAccept(proposal));
        const dismiss = el("button", { type: "button", class: "dismiss danger", "data-key": `dismiss:${proposal.id}`, text: "Dismiss…" });
        dismiss.addEventListener("click", () => askDismiss(proposal));
        card.append(el("p", {}, accept, " ", dismiss));
      } else {
        card.append(el("p", { class: "read-only empty", text: "A commander accepts or dismisses it." }));
      }
      return card;
    }),
  );
}

function renderClosedProposals(closed) {
  show($("closed-proposals-empty"), closed.length === 0);
  show($("closed-proposals-table"), closed.length > 0);
  $("closed-proposals").replaceChildren(
    ...closed.map((proposal) =>
      el(
        "tr",
        { class: "closed-proposal", "data-proposal-id": proposal.id },
        el("td", { text: `${proposal.question} (${proposal.id})` }),
        el("td", { class: "text", text: proposal.evidence }),
        el("td", { class: "state", text: `${proposal.state} at ${when(proposal.closedAt)}` }),
        el("td", { class: "by", text: proposal.closedBy }),
        el("td", { class: "text reason", text: proposal.closedReason }),
        el("td", { text: proposal.incidentId || "—" }),
      ),
    ),
  );
}

function askAccept(proposal) {
  const runbook = session.runbooks.find((r) => r.name === proposal.type);
  const namespace = session.namespace;
  confirmAction({
    title: `Accept ${proposal.id}: declare ${proposal.type} at ${proposal.severity}`,
    context: [
      el("p", { class: "evidence", text: `Evidence: ${proposal.evidence}` }),
      el("p", { text: "Accepting declares the incident below; its timeline cites the evidence. The preview is the declaration's dry run." }),
      stageDetails(runbook, proposal.severity),
    ],
    preview: (reason) =>
      call("DeclareIncident", { namespace, type: proposal.type, severity: proposal.severity, reason, dryRun: true }),
    commit: async (reason) => {
      const answer = await call("AcceptProposal", { namespace, proposalId: proposal.id, reason, changeId: session.changeId });
      return outcome(answer, `Accepted ${proposal.id}: declared ${answer.incident.id} at revision ${answer.revision}.`);
    },
  });
}

function askDismiss(proposal) {
  const namespace = session.namespace;
  confirmAction({
    title: `Dismiss ${proposal.id}: ${proposal.question}`,
    context: [
      el("p", { class: "evidence", text: `Evidence: ${proposal.evidence}` }),
      el("p", { text: "Nothing is declared. The reason is recorded in the audit log." }),
    ],
    preview: null,
    commit: async (reason) => {
      await call("DismissProposal", { namespace, proposalId: proposal.id, reason, changeId: session.changeId });
      return `Dismissed ${proposal.id}.`;
    },
  });
}

// === Insights ===

const insights = {
  // The next read while the view is open.
  timer: null,
  // A read is under way (never more than one), and another is wanted
  // after it.
  reading: false,
  again: false,
};

function insightsOpen() {
  return Boolean(session.who) && session.view === "insights";
}

function stopInsights() {
  clearTimeout(insights.timer);
  insights.timer = null;
  insights.again = false;
}

/// Forgets what was shown (another namespace, signed out).
function clearInsights() {
  stopInsights();
  for (const id of ["insights-map", "insights-live", "insights-soft", "insights-dead", "insights-signals", "insights-replicas"]) {
    $(id).replaceChildren();
  }
  $("insights-state").textContent = "";
  show($("insights-partial"), false);
  show($("insights-more"), false);
}

/// Reads the insights (a fleet gather, with the call's deadline), once at a
/// time: asked during a read, it reads again after it. While the view is
/// open it reads again every INSIGHTS_EVERY_MS, and when the namespace's
/// revision moves.
async function readInsights() {
  if (!insightsOpen()) return;
  if (insights.reading) {
    insights.again = true;
    return;
  }
  insights.reading = true;
  clearTimeout(insights.timer);
  insights.timer = null;
  try {
    do {
      insights.again = false;
      const namespace = session.namespace;
      const windowSeconds = Number($("insights-window").value);
      const slow = setTimeout(() => {
        $("insights-state").textContent = "Gathering the fleet's reports…";
      }, 1000);
      try {
        const answer = await call("GetInsights", { namespace, windowSeconds });
        if (namespace === session.namespace && insightsOpen()) drawInsights(answer);
      } catch (error) {
        if (error instanceof ApiError && error.status === 401) {
          signOut(error.message);
          return;
        }
        if (namespace === session.namespace && insightsOpen()) {
          $("insights-state").textContent = `The insights could not be read: ${error.message}. What is below was read before.`;
        }
      } finally {
        clearTimeout(slow);
      }
    } while (insights.again && insightsOpen());
  } finally {
    insights.reading = false;
    if (insightsOpen()) {
      clearTimeout(insights.timer);
      insights.timer = setTimeout(readInsightsAgain, INSIGHTS_EVERY_MS);
    }
  }
}

/// The interval's read: skipped while the tab is in the background (it
/// reads when it is in front again), so that forgotten tabs cost the fleet
/// no gathers.
function readInsightsAgain() {
  if (document.hidden) {
    insights.timer = setTimeout(readInsightsAgain, INSIGHTS_EVERY_MS);
    return;
  }
  readInsights();
}

session.onRevision.add(() => readInsights());
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) readInsights();
});

/// The fields of GetInsightsResponse the page draws; any other (a newer
/// server's) is shown as it came, in "More in the answer".
const INSIGHTS_FIELDS = new Set([
  "namespace", "revision", "windowSeconds", "staticMap", "live", "softDowntime", "deadEnds", "signals", "replicas", "partial", "problems", "decisions",
  "refusedReports", "refused",
]);

function isDefault(value) {
  if (value === null || value === undefined || value === false || value === "" || value === 0 || value === "0") return true;
  if (Array.isArray(value)) return value.length === 0;
  if (typeof value === "object") return Object.values(value).every(isDefault);
  return false;
}

function drawInsights(answer) {
  const replicas = answer.replicas || [];
  const answered = replicas.filter((r) => r.answered);
  $("insights-state").textContent =
    `${answer.namespace} at revision ${answer.revision}, last ${windowText(answer.windowSeconds)}: ` +
    `${answer.decisions || 0} decision(s) reported; read at ${new Date().toLocaleTimeString()} ` +
    `from ${answered.length} of ${replicas.length} replica(s).`;
  // A replica that did not answer is named (once: the server's problems
  // may name it already), one line each.
  const problems = answer.problems || [];
  const missing = replicas.filter((r) => !r.answered && !problems.some((p) => p.includes(`replica ${r.replica} `)));
  const partial = $("insights-partial");
  partial.textContent = [
    answer.partial ? "PARTIAL: some replica did not answer or some counts were left out; the counts below may be low." : "",
    ...missing.map((r) => `${r.replica} (${r.address}) DID NOT ANSWER: ${r.error || "no answer"}.`),
    ...problems.map((p) => `Problem: ${p}`),
  ]
    .filter(Boolean)
    .join("\n");
  show(partial, Boolean(partial.textContent));
  const maps = answer.staticMap || [];
  rerender("insights-map", maps, () => renderInsightsMap(maps));
  const live = answer.live || [];
  rerender("insights-live", live, () => renderInsightsLive(live));
  const soft = answer.softDowntime || [];
  rerender("insights-soft", soft, () => {
    show($("insights-soft-empty"), soft.length === 0);
    $("insights-soft").replaceChildren(
      ...soft.map((s) =>
        el("li", { class: "soft-downtime state-rejected", "data-channel": s.channel, text: `${s.channel} ${String(s.kind).toUpperCase()}: ${s.detail}` }),
      ),
    );
  });
  const dead = answer.deadEnds || [];
  rerender("insights-dead", dead, () => {
    show($("insights-dead-empty"), dead.length === 0);
    $("insights-dead").replaceChildren(
      ...dead.map((d) => el("li", { class: "dead-end", text: `${d.action}: ${(d.channels || []).join("; ")}` })),
    );
  });
  const signals = answer.signals || [];
  rerender("insights-signals", signals, () => {
    show($("insights-signals-empty"), signals.length === 0);
    show($("insights-signals-table"), signals.length > 0);
    $("insights-signals").replaceChildren(
      ...signals.map((s) =>
        el("tr", { class: "signal" }, el("td", { text: s.channel }), el("td", { text: s.name }), el("td", { text: String(s.count) })),
      ),
    );
  });
  // Absent from an older server's answer: it does not say.
  const refused = answer.refused || [];
  rerender("insights-refused", ["refusedReports" in answer, answer.refusedReports, refused], () => {
    const total = Number(answer.refusedReports || 0);
    $("insights-refused-total").textContent = !("refusedReports" in answer)
      ? "This replica does not say."
      : total === 0
        ? "None refused."
        : `${total} report(s) refused or cut short: a flooding or misbehaving subscriber, or one whose token may not report. By subscriber and why, most first:`;
    show($("insights-refused-table"), refused.length > 0);
    $("insights-refused").replaceChildren(
      ...refused.map((r) =>
        el(
          "tr",
          { class: "refused", "data-channel": r.channel },
          el("td", { text: r.channel }),
          el("td", {
            class: "subscriber text",
            text: r.subscriber
              ? `${r.subscriber} (${r.principal || "?"})`
              : `other subscribers of ${r.principal || "?"}`,
          }),
          el("td", { text: String(r.why).replaceAll("_", " ") }),
          el("td", { text: String(r.count) }),
        ),
      ),
    );
  });
  rerender("insights-replicas", replicas, () =>
    $("insights-replicas").replaceChildren(
      ...replicas.map((r) =>
        r.answered
          ? el("li", { class: "replica", text: `${r.replica} (${r.address}): answered` })
          : el("li", { class: "replica state-rejected", text: `${r.replica} (${r.address}): DID NOT ANSWER — ${r.error}` }),
      ),
    ),
  );
  const more = Object.fromEntries(Object.entries(answer).filter(([key, value]) => !INSIGHTS_FIELDS.has(key) && !isDefault(value)));
  show($("insights-more"), Object.keys(more).length > 0);
  const text = JSON.stringify(more, null, 2);
  if ($("insights-more-text").textContent !== text) $("insights-more-text").textContent = text;
}

function renderInsightsMap(maps) {
  show($("insights-map-empty"), maps.length === 0);
  show($("insights-map-table"), maps.length > 0);
  $("insights-map").replaceChildren(
    ...maps.map((map) => {
      // Empty when no channel itself offers a path (each routes elsewhere
      // or denies).
      const easiest = map.differs ? map.easiestChannel || "" : "";
      return el(
        "tr",
        { class: map.differs ? "action-map differs-row" : "action-map", "data-action": map.action },
        el("th", { scope: "row", text: map.action }),
        el(
          "td",
          {},
          el(
            "ol",
            { class: "outcomes inline" },
            ...(map.channels || []).map((c) =>
              el("li", {
                class: c.channel === easiest ? "channel-outcome easiest" : "channel-outcome",
                "data-channel": c.channel,
                title: c.detail || undefined,
                text: `${c.channel} ${String(c.effect).toUpperCase()}${c.channel === easiest ? " ← easiest path" : ""}`,
              }),
            ),
          ),
        ),
        el(
          "td",
          { class: map.differs ? "differs easiest-channel" : "alike" },
          map.differs ? easiest || "none: no channel offers a path itself" : "every channel alike",
        ),
      );
    }),
  );
}

function outcomeNotes(o) {
  const notes = [];
  if (o.oldRevision) notes.push(`OLD revision ${o.revision}`);
  if (o.failedClosed) notes.push("FAILING CLOSED");
  else if (o.stale) notes.push("STALE");
  return notes.join("; ");
}

function renderInsightsLive(live) {
  show($("insights-live-empty"), live.length === 0);
  $("insights-live").replaceChildren(
    ...live.map((d) =>
      el(
        "li",
        { class: "live-difference", "data-action": d.action },
        el("h4", {
          text: `${d.action} (${d.contextText || "context not said"}): ${d.total} decision(s), ${d.acrossChannels ? "different across channels" : "different across subscribers or revisions of one channel"}`,
        }),
        el(
          "table",
          {},
          el("caption", { class: "visually-hidden", text: `Who decided what for ${d.action}` }),
          el(
            "thead",
            {},
            el("tr", {}, ...["Channel", "Subscriber", "Revision", "Effect", "Decisions", "Notes"].map((h) => el("th", { scope: "col", text: h }))),
          ),
          el(
            "tbody",
            {},
            ...(d.outcomes || []).map((o) => {
              const notes = outcomeNotes(o);
              return el(
                "tr",
                { class: notes ? "outcome noted" : "outcome", "data-channel": o.channel },
                el("td", { text: o.channel }),
                el("td", { class: "subscriber text", text: o.subscriber || "—" }),
                el("td", { text: String(o.revision) }),
                el("td", { text: String(o.effect).toUpperCase() }),
                el("td", { text: String(o.count) }),
                el("td", { class: "notes", text: notes }),
              );
            }),
          ),
        ),
      ),
    ),
  );
}

// === Decision preview ===

/// The decision last shown, recomputed when the namespace moves.
let decided = null;

async function decide(again = null) {
  const amount = $("decide-amount").value;
  const request = again || {
    namespace: session.namespace,
    channel: $("decide-channel").value,
    action: $("decide-action").value.trim(),
    confidence: Number($("decide-confidence").value || 0),
    methods: [...document.querySelectorAll("#decide-methods input:checked")].map((i) => i.value),
    attempts: Number($("decide-attempts").value || 0),
    handoffFromBot: $("decide-handoff").checked,
  };
  if (!again && amount !== "") request.amount = Number(amount);
  decided = request;
  const result = $("decide-result");
  try {
    const answer = await call("Decide", request);
    if (decided !== request) return;
    result.replaceChildren(
      el(
        "dl",
        { class: "stage" },
        el("dt", { text: "Effect" }),
        el("dd", { class: "decide-effect", text: answer.effect.toUpperCase() }),
        el("dt", { text: "In detail" }),
        el("dd", { text: answer.detail }),
        el("dt", { text: "Because of" }),
        el("dd", { text: answer.reasons.join(", ") || "no rule: allowed" }),
        el("dt", { text: "The customer is told" }),
        el("dd", { text: answer.customerMessage || "(nothing)" }),
        el("dt", { text: "The agent is told" }),
        el("dd", { text: answer.agentScript || "(nothing)" }),
        el("dt", { text: "Rules of" }),
        el("dd", { class: "decide-revision", text: `${answer.namespace} at revision ${answer.revision}, channel ${answer.channel}` }),
      ),
      ...(again ? [el("p", { class: "recomputed", text: `Recomputed: the namespace moved to revision ${answer.revision}.` })] : []),
    );
  } catch (e) {
    result.replaceChildren(el("p", { class: "warning", text: e.message }));
  }
}

// A decision shown is of the rules at one revision: when the namespace
// moves, it is decided again.
session.onRevision.add(() => {
  if (decided && decided.namespace === session.namespace) decide(decided);
});

// === The audit log ===

function renderAuditChoices(incidents) {
  const select = $("audit-incident");
  const chosen = select.value;
  select.replaceChildren(
    el("option", { value: "", text: "all" }),
    ...incidents.map((i) => el("option", { value: i.id, text: `${i.id} (${i.type}, ${i.status})` })),
  );
  select.value = incidents.some((i) => i.id === chosen) ? chosen : "";
}

const AUDIT_SHOWN = 200;
const AUDIT_PAGES = 20;

async function readAudit() {
  const incidentId = $("audit-incident").value;
  const result = $("audit-result");
  result.textContent = "Reading and verifying the whole log…";
  try {
    // The first page verifies the whole log; later pages only read.
    let entries = [];
    let first = null;
    let after = "0";
    let unread = false;
    for (let page = 0; ; page++) {
      if (page === AUDIT_PAGES) {
        unread = true;
        break;
      }
      const answer = await call("GetAudit", {
        incidentId,
        namespace: session.namespace,
        verify: page === 0,
        afterSeq: after,
        limit: 500,
      });
      entries = entries.concat(answer.entries).slice(-AUDIT_SHOWN);
      after = String(answer.nextAfterSeq || "0");
      if (page === 0) {
        first = answer;
        // The newest are wanted: without an incident to pick out, go
        // straight to the last entries before the head.
        const head = BigInt(answer.headSeq || "0");
        if (!incidentId && after !== "0" && head > BigInt(AUDIT_SHOWN)) {
          entries = [];
          after = String(head - BigInt(AUDIT_SHOWN));
        }
      }
      if (after === "0") break;
    }
    const problems = first.problems || [];
    result.textContent =
      (problems.length === 0
        ? "Verified: the log is intact (every entry chained, signed by a trusted key, and the state matches)."
        : `Verification found ${first.problemsTotal} problem(s): ${problems.join("; ")}`) +
      (unread
        ? ` Only the log up to entry ${entries.length ? entries[entries.length - 1].seq : "?"} was read for this incident; newer entries may follow (safemode audit --incident reads them all).`
        : "");
    result.className = problems.length === 0 ? "state-synced" : "state-rejected";
    show($("audit-head-row"), first.headSeq !== "0");
    $("audit-head").textContent = `${first.headSeq} ${first.headHash}`;
    show($("audit-table"), true);
    $("audit-entries").replaceChildren(
      ...entries
        .reverse()
        .map((e) =>
          el(
            "tr",
            { class: "audit-entry" },
            el("td", { text: e.seq }),
            el("td", { text: when(e.at) }),
            el("td", { text: e.action }),
            el("td", { text: e.principal }),
            el("td", { class: "text", text: e.reason }),
            el("td", { class: "text", text: [e.incidentId, e.requestId, e.detail].filter(Boolean).join(" ") }),
          ),
        ),
    );
  } catch (e) {
    result.textContent = e.message;
    result.className = "state-rejected";
  }
}

async function copyHead() {
  const text = $("audit-head").textContent;
  try {
    await navigator.clipboard.writeText(text);
    say("The audit head is copied: keep it somewhere else to check later that the log was not rewritten.");
  } catch {
    // No clipboard (a plain-HTTP page off loopback): select it for the person.
    const range = document.createRange();
    range.selectNodeContents($("audit-head"));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    say("Press Ctrl+C to copy the selected head.");
  }
}

/// Draws the fleet's propagation of `namespace` as gathered (here, or by
/// the leading tab).
function drawFleet(namespace, status) {
  if (namespace !== session.namespace) return;
  $("propagation-state").textContent = "";
  session.fleetPartial = status.partial;
  session.fleetProblems = status.problems || [];
  showProblems();
  rerender("propagation", [status.channels, status.replicas, status.revision, status.subscribers, status.subscriberCount], () =>
    renderPropagation(status),
  );
}

function fleetFailed(namespace, message) {
  if (namespace !== session.namespace) return;
  $("propagation-state").textContent = `The fleet's propagation could not be gathered: ${message}. What is below was gathered before.`;
}

// === Live updates ===

let streamGeneration = 0;

function stopFollowing() {
  streamGeneration++;
  if (session.stream) session.stream.abort();
  session.stream = null;
  if (session.lockRequest) session.lockRequest.abort();
  session.lockRequest = null;
  if (session.channel) session.channel.close();
  session.channel = null;
  session.leading = false;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/// FNV-1a of `text`, in hex: a short name for a credential, so that the
/// tabs signed in alike share a stream (not a secret: other tabs of this
/// origin could read their own tokens anyway).
function shortHash(text) {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return hash.toString(16);
}

/// One event of the stream, in the tab that holds it or one it passed it to.
function onEvent(name, data) {
  if (name === "hello" || name === "change") setStream("Live");
  if (name === "change") {
    if (data.revision) namespaceAt(data.revision);
    if (data.what === "fleet") refreshFleet();
    else refresh();
  }
  if (name === "trouble") {
    setStream(`Not live: ${data.message || "the replica cannot read the namespace"}`);
    refresh();
  }
  if (name === "end" && data.code === "unauthenticated") {
    signOut(data.message);
  }
}

const sharing = typeof navigator.locks !== "undefined" && typeof BroadcastChannel !== "undefined";

/// Follows /api/v1/events, once per browser for the tabs signed in alike on
/// one namespace: one tab leads and holds the stream, the others hear its
/// events; when the leader goes, the next tab waiting takes the lock.
function follow() {
  stopFollowing();
  const generation = streamGeneration;
  if (!sharing) {
    lead(generation, null);
    return;
  }
  const key = `safemode-events:${session.namespace}:${shortHash(JSON.stringify(credentials()))}`;
  const channel = new BroadcastChannel(key);
  session.channel = channel;
  channel.onmessage = (message) => {
    if (generation !== streamGeneration) return;
    const { kind, name, data, text } = message.data || {};
    if (kind === "ask" && session.leading) channel.postMessage({ kind: "state", text: liveness.stream });
    if (kind === "fleet?" && session.leading) refreshFleet();
    if (session.leading) return;
    if (kind === "state") setStream(text);
    if (kind === "fleet" && message.data.status) drawFleet(message.data.namespace, message.data.status);
    if (kind === "fleet" && message.data.error) fleetFailed(message.data.namespace, message.data.error);
    if (kind === "event") onEvent(name, data || {});
  };
  const abort = new AbortController();
  session.lockRequest = abort;
  setStream("Joining the live stream of another tab…");
  navigator.locks
    .request(key, { signal: abort.signal }, async () => {
      if (generation !== streamGeneration) return;
      session.leading = true;
      // What happened while no tab led.
      refresh();
      await lead(generation, channel);
    })
    .catch(() => {});
  channel.postMessage({ kind: "ask" });
}

/// Holds the event stream: handles each event and passes it on to the
/// other tabs; reconnects when the stream ends (each lasts ten minutes),
/// breaks, or says nothing for too long.
async function lead(generation, channel) {
  const tell = (text) => {
    setStream(text);
    if (channel && generation === streamGeneration) channel.postMessage({ kind: "state", text });
  };
  while (generation === streamGeneration) {
    const controller = new AbortController();
    session.stream = controller;
    // No answer, or silence on the stream: give up on it and reconnect.
    let watchdog = setTimeout(() => controller.abort(), CALL_DEADLINE_MS);
    const heard = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => controller.abort(), STREAM_SILENCE_MS);
    };
    try {
      const answer = await fetch(`/api/v1/events?namespace=${encodeURIComponent(session.namespace)}`, {
        headers: credentials(),
        credentials: "omit",
        cache: "no-store",
        signal: controller.signal,
      });
      heard();
      if (!answer.ok) {
        const body = await answer.json().catch(() => ({}));
        if (answer.status === 401) {
          onEvent("end", { code: "unauthenticated", message: body.message || "signed out" });
          if (channel) channel.postMessage({ kind: "event", name: "end", data: { code: "unauthenticated", message: body.message } });
          return;
        }
        tell(`Not live: ${body.message || `HTTP ${answer.status}`}`);
        clearTimeout(watchdog);
        await sleep(3000);
        continue;
      }
      tell("Live");
      const reader = answer.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        heard();
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const name = (block.match(/^event: (.*)$/m) || [])[1];
          if (!name || generation !== streamGeneration) continue;
          const data = JSON.parse((block.match(/^data: (.*)$/m) || [, "{}"])[1]);
          if (channel) channel.postMessage({ kind: "event", name, data });
          onEvent(name, data);
          if (name === "end" && data.code === "unauthenticated") return;
          if (channel && (name === "hello" || name === "change" || name === "trouble")) {
            channel.postMessage({ kind: "state", text: liveness.stream });
          }
        }
      }
    } catch (e) {
      if (generation !== streamGeneration) return;
    } finally {
      clearTimeout(watchdog);
    }
    if (generation !== streamGeneration) return;
    tell("Reconnecting…");
    await sleep(1000);
    // Whatever happened while the stream was down.
    refresh();
  }
}

// Without a shared stream (a browser without locks), a tab in the
// background gives its stream back: a browser holds only six plain-HTTP
// connections to one host. Back in front, it reads and follows again.
document.addEventListener("visibilitychange", () => {
  if (sharing || !session.who) return;
  if (document.hidden) {
    stopFollowing();
    setStream("Paused while this tab is in the background");
  } else {
    refresh();
    follow();
  }
});

// === Wiring ===

function wireForms() {
  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    const principal = $("principal").value.trim();
    session.token = $("token-row").hidden ? "" : token;
    session.principal = $("principal-row").hidden ? "" : principal;
    if (!session.token && !session.principal) {
      fail($("token-row").hidden ? "Give your name." : "Paste your token.");
      return;
    }
    if (session.token) sessionStorage.setItem(TOKEN_KEY, session.token);
    if (session.principal) sessionStorage.setItem(PRINCIPAL_KEY, session.principal);
    $("token").value = "";
    try {
      await signIn();
    } catch (error) {
      session.token = "";
      sessionStorage.removeItem(TOKEN_KEY);
      showSignIn(error, !$("token-row").hidden);
      fail(error.message);
    }
  });
  $("signout").addEventListener("click", () => signOut(""));
  $("namespace-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const namespace = $("namespace").value.trim() || "live";
    try {
      const who = await call("WhoAmI", { namespaces: [namespace] });
      session.namespace = namespace;
      session.readAt = null;
      session.revision = null;
      session.may = who.permissions[0];
      drawn.clear();
      clearInsights();
      applyPermissions();
      say("");
      await refresh();
      follow();
      readInsights();
    } catch (e) {
      fail(e.message);
    }
  });
  $("declare-runbook").addEventListener("change", fillSeverities);
  $("declare-severity").addEventListener("change", showStage);
  $("declare-form").addEventListener("submit", (event) => {
    event.preventDefault();
    askDeclare();
  });
  $("apply-form").addEventListener("submit", (event) => {
    event.preventDefault();
    askApply();
  });
  $("decide-form").addEventListener("submit", (event) => {
    event.preventDefault();
    decide();
  });
  $("audit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    readAudit();
  });
  $("audit-copy").addEventListener("click", copyHead);
  for (const button of document.querySelectorAll("#views button")) {
    button.addEventListener("click", () => showView(button.dataset.view));
  }
  $("proposals-banner-go").addEventListener("click", () => {
    showView("proposals");
    $("view-proposals").focus();
  });
  $("insights-form").addEventListener("submit", (event) => {
    event.preventDefault();
    readInsights();
  });
  $("insights-window").addEventListener("change", () => readInsights());
}

start();
