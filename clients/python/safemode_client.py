#!/usr/bin/env python3
"""A safemode subscriber in Python, built from proto/ alone.

It proves the wire API stands alone: nothing here comes from the Rust crate.
The gRPC code is generated from ``proto/safemode/v1/*.proto`` with grpcio-tools
when the client starts (``generate()``), so it can never drift from the protos.

- ``Subscriber`` opens the one bidirectional ``Subscribe`` stream, says hello,
  keeps the newest snapshot for its channel, acks every snapshot it applies and
  rejects (with a reason) one it cannot use while keeping the previous one, and
  counts heartbeats as contact with the controller. When the stream breaks it
  opens another (the next server, after a jittered backoff) whose hello names
  the revision and epoch it holds; it stops for good only when every server
  refuses its token.
- It counts its decisions (by action, effect, revision and context class) and
  named signals (``signal("login.failed")``) and reports them on the stream
  every 10 s, as the Rust client does; ``report_now()`` sends at once.
- ``decide(rules, action, context)`` evaluates a snapshot's compiled
  ``ChannelRules`` by lookup, exactly as ``policy.proto`` describes.
- Run as a script, it subscribes, waits for a revision, evaluates a file of
  cases and prints one JSON object (see README.md).

Dependencies: ``python3 -m pip install grpcio grpcio-tools``.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import ipaddress
import json
import os
import queue
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

HERE = Path(__file__).resolve().parent
# clients/python/ sits two levels below the repository root.
DEFAULT_PROTO_DIR = HERE.parent.parent / "proto"
PROTO_FILES = (
    "safemode/v1/policy.proto",
    "safemode/v1/subscription.proto",
    "safemode/v1/control.proto",
)
# The snapshot format this client reads (Snapshot.schema_version).
SCHEMA_VERSION = 1
# The actions a report may name (a bot intent is reported as "bot.intent").
KNOWN_ACTIONS = (
    "account.password_reset", "account.email_change", "account.phone_change",
    "account.mfa_reset", "account.recovery", "payment.refund", "payment.payout",
    "order.view", "balance.view", "contact.intake", "handoff.ai_to_human",
)
# How often a report goes, and its bounds (see subscription.proto's Report).
REPORT_EVERY = 10.0
MAX_DECISION_ROWS = 1024
MAX_SIGNALS = 64
REPORTS_HEADER = "x-safemode-reports"
# The reconnect backoff, in seconds.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
INSTALL_HINT = "install them with: python3 -m pip install grpcio grpcio-tools"


class SafemodeError(Exception):
    """Something a person must act on; the message says what."""


# === Generated code ===


def generate(out_dir: os.PathLike | str, proto_dir: os.PathLike | str = DEFAULT_PROTO_DIR) -> Path:
    """Generates the Python gRPC code for proto/ into ``out_dir``.

    The same as ``generate.sh``: grpcio-tools' bundled protoc, with its copy of
    the well-known types (google/protobuf/timestamp.proto) on the include path.
    """
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise SafemodeError(f"grpcio-tools is missing ({e}); {INSTALL_HINT}") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proto_dir = Path(proto_dir)
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *(str(proto_dir / f) for f in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise SafemodeError(f"protoc failed on {proto_dir}; see the messages above")
    return out


class Wire:
    """The generated modules: ``policy``, ``subscription`` and its ``grpc`` stubs."""

    def __init__(self, gen_dir: Path):
        sys.path.insert(0, str(gen_dir))
        self.policy = importlib.import_module("safemode.v1.policy_pb2")
        self.subscription = importlib.import_module("safemode.v1.subscription_pb2")
        self.grpc = importlib.import_module("safemode.v1.subscription_pb2_grpc")


_wire: Optional[Wire] = None
_wire_lock = threading.Lock()


def load_wire(gen_dir: os.PathLike | str | None = None,
              proto_dir: os.PathLike | str = DEFAULT_PROTO_DIR) -> Wire:
    """Generates (into ``gen_dir``, else a fresh temporary directory) and imports
    the gRPC code, once per process."""
    global _wire
    with _wire_lock:
        if _wire is None:
            if gen_dir is None:
                gen_dir = tempfile.mkdtemp(prefix="safemode-py-")
                # The modules stay loaded; the files are not needed after import.
                atexit.register(shutil.rmtree, gen_dir, True)
            _wire = Wire(generate(gen_dir, proto_dir))
        return _wire


# === Deciding ===

# Least to most restrictive, as policy.proto orders them.
KINDS = ("allow", "throttle", "step_up", "review", "read_only", "route", "deny")
RANK = {kind: i for i, kind in enumerate(KINDS)}


def _effect(message) -> dict:
    """A wire Effect as a plain dict with its parameters (``kind`` first)."""
    kind = message.WhichOneof("kind")
    if kind is None:
        raise ValueError("effect is missing")
    p = getattr(message, kind)
    if kind == "throttle":
        return {"kind": kind, "max": p.max, "window_seconds": p.window_seconds}
    if kind == "step_up":
        return {
            "kind": kind,
            "min_confidence": p.min_confidence,
            "methods": list(p.methods),
            "max_attempts": p.max_attempts,
            "escalate_queue": p.escalate_queue,
        }
    if kind == "review":
        return {"kind": kind, "queue": p.queue}
    if kind == "read_only":
        as_of = (p.as_of.seconds, p.as_of.nanos) if p.HasField("as_of") else None
        return {"kind": kind, "as_of": as_of}
    if kind == "route":
        return {"kind": kind, "to": list(p.to_channels)}
    if kind == "deny":
        return {"kind": kind, "alternative": p.alternative}
    return {"kind": "allow"}


def _merge_throttle(a: dict, b: dict) -> dict:
    return {"max": min(a["max"], b["max"]),
            "window_seconds": max(a["window_seconds"], b["window_seconds"])}


def _merge(a: dict, b: dict) -> dict:
    """Combines two effects toward safety; ``a`` leads (its texts win).

    The more restrictive kind wins; the same kind merges its limits: highest
    confidence, common methods, fewest attempts, lowest throttle over the
    longest window, earliest as-of, common route targets.
    """
    kind = a["kind"]
    if kind == b["kind"]:
        if kind == "throttle":
            return {"kind": kind, **_merge_throttle(a, b)}
        if kind == "step_up":
            return {
                "kind": kind,
                "min_confidence": max(a["min_confidence"], b["min_confidence"]),
                "methods": [m for m in a["methods"] if m in b["methods"]],
                "max_attempts": min(a["max_attempts"], b["max_attempts"]),
                "escalate_queue": a["escalate_queue"],
            }
        if kind == "read_only":
            times = [t for t in (a["as_of"], b["as_of"]) if t is not None]
            return {"kind": kind, "as_of": min(times) if times else None}
        if kind == "route":
            return {"kind": kind, "to": [c for c in a["to"] if c in b["to"]]}
        return a
    return b if RANK[b["kind"]] > RANK[kind] else a


def _holds(when, ctx: dict) -> bool:
    """Whether a wire Condition holds; every part that is set must hold."""
    if when.HasField("handoff_from_bot") and when.handoff_from_bot != ctx["handoff_from_bot"]:
        return False
    # An unknown amount gets the stricter rule: the condition holds.
    if when.HasField("amount_over") and ctx["amount"] is not None \
            and not ctx["amount"] > when.amount_over:
        return False
    if when.bot_flags_any and not any(f in ctx["bot_flags"] for f in when.bot_flags_any):
        return False
    return True


def lookup(rules, action: str):
    """The ActionPolicy for ``action``: its own key, else its dotted prefixes
    from the longest (``account.*``), else ``*``; ``None``: no rule (allow)."""
    actions = rules.actions
    if action in actions:
        return actions[action]
    end = len(action)
    while (dot := action.rfind(".", 0, end)) >= 0:
        key = action[:dot] + ".*"
        if key in actions:
            return actions[key]
        end = dot
    return actions["*"] if "*" in actions else None


def context(raw: Optional[dict] = None) -> dict:
    """A decision context with every field, from a partial dict."""
    raw = raw or {}
    unknown = set(raw) - {"confidence", "methods", "failed_attempts", "amount",
                          "handoff_from_bot", "bot_flags"}
    if unknown:
        raise ValueError(f"unknown context fields: {', '.join(sorted(unknown))}")
    amount = raw.get("amount")
    return {
        "confidence": float(raw.get("confidence", 0.0)),
        "methods": list(raw.get("methods", [])),
        "failed_attempts": int(raw.get("failed_attempts", 0)),
        "amount": None if amount is None else float(amount),
        "handoff_from_bot": bool(raw.get("handoff_from_bot", False)),
        "bot_flags": list(raw.get("bot_flags", [])),
    }


def format_timestamp(t: Optional[tuple]) -> Optional[str]:
    """RFC 3339 in UTC, with as many fractional digits as the time needs."""
    if t is None:
        return None
    seconds, nanos = t
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"


def _text(s: str) -> Optional[str]:
    return s or None


def decide(rules, action: str, ctx: Optional[dict] = None) -> dict:
    """Decides ``action`` with a snapshot's compiled ``ChannelRules``.

    Returns ``{"effect": kind, ...parameters, "reasons": [activation ids],
    "customer_message": str|None, "agent_script": str|None}``. Parameters by
    effect: throttle ``max, window_seconds``; step_up ``min_confidence,
    methods, max_attempts, escalate_queue, attempts_left``; review ``queue,
    escalated``; read_only ``as_of``; route ``to``; deny ``alternative``.
    """
    ctx = context(ctx)
    decision = {"effect": "allow", "reasons": [], "customer_message": None, "agent_script": None}
    policy = lookup(rules, action)
    if policy is None:
        return decision
    # Precedence order: the conditional entries that hold, in their listed
    # order, then the base.
    applied = [e for e in policy.conditional if _holds(e.when, ctx)]
    if policy.HasField("base"):
        applied.append(policy.base)
    if not applied:
        return decision

    effect = None
    standing = None  # (merged limit, the leading entry's StandingThrottle)
    for entry in applied:
        e = _effect(entry.effect)
        effect = e if effect is None else _merge(effect, e)
        if entry.HasField("throttle"):
            limit = {"max": entry.throttle.limit.max,
                     "window_seconds": entry.throttle.limit.window_seconds}
            standing = (limit, entry.throttle) if standing is None \
                else (_merge_throttle(standing[0], limit), standing[1])

    kind = effect["kind"]
    outcome = _resolve(effect, standing[0] if standing else None, ctx)
    if standing is not None and kind != "throttle" and outcome["effect"] == "throttle":
        # A passed step-up leaves the standing throttle: its rule speaks.
        message, script = standing[1].customer_message, standing[1].agent_script
    else:
        leader = next((e for e in applied if e.effect.WhichOneof("kind") == kind), None)
        message, script = (leader.customer_message, leader.agent_script) if leader else ("", "")

    reasons: list = []
    for entry in applied:
        for activation_id in entry.activation_ids:
            if activation_id not in reasons:
                reasons.append(activation_id)
    return {**outcome, "reasons": reasons,
            "customer_message": _text(message), "agent_script": _text(script)}


def _resolve(effect: dict, throttle: Optional[dict], ctx: dict) -> dict:
    """A merged effect resolved against the context, as the decision's effect
    and parameters."""
    kind = effect["kind"]
    params = {k: v for k, v in effect.items() if k != "kind"}
    if kind == "step_up":
        if not effect["methods"] or ctx["failed_attempts"] >= effect["max_attempts"]:
            return {"effect": "review", "queue": effect["escalate_queue"], "escalated": True}
        if ctx["confidence"] >= effect["min_confidence"] \
                and any(m in effect["methods"] for m in ctx["methods"]):
            return {"effect": "throttle", **throttle} if throttle else {"effect": "allow"}
        return {"effect": kind, **params,
                "attempts_left": effect["max_attempts"] - ctx["failed_attempts"]}
    if kind == "review":
        return {"effect": kind, **params, "escalated": False}
    if kind == "read_only":
        return {"effect": kind, "as_of": format_timestamp(effect["as_of"])}
    if kind == "route" and not effect["to"]:
        # No acceptable channel is left: nowhere to send the customer.
        return {"effect": "deny", "alternative": None}
    if kind == "deny":
        return {"effect": kind, "alternative": _text(effect["alternative"])}
    return {"effect": kind, **params}


def check_rules(rules) -> None:
    """Raises ValueError naming the first part of ``rules`` this client cannot
    evaluate safely."""
    for key, policy in rules.actions.items():
        entries = [("base", policy.base, False)] if policy.HasField("base") else []
        entries += [(f"conditional[{i}]", e, True) for i, e in enumerate(policy.conditional)]
        for name, entry, conditional in entries:
            where = f"rules[{key}].{name}"
            if entry.HasField("when") != conditional:
                raise ValueError(f"{where}: " + ("conditional entry without a condition"
                                                 if conditional else "base entry with a condition"))
            try:
                e = _effect(entry.effect)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            if e["kind"] == "step_up" and (not 0.0 <= e["min_confidence"] <= 1.0
                                           or e["max_attempts"] == 0):
                raise ValueError(f"{where}: step_up needs min_confidence in 0..1 and max_attempts >= 1")
            limits = [e] if e["kind"] == "throttle" else []
            if entry.HasField("throttle"):
                limits.append({"max": entry.throttle.limit.max,
                               "window_seconds": entry.throttle.limit.window_seconds})
            if any(t["max"] == 0 or t["window_seconds"] == 0 for t in limits):
                raise ValueError(f"{where}: throttle max and window_seconds must be at least 1")


# === Subscribing ===


class Snapshot:
    """An applied snapshot: the wire message and when it was applied."""

    def __init__(self, message, applied_at: float):
        self.message = message
        self.applied_at = applied_at

    @property
    def revision(self) -> int:
        return self.message.revision

    @property
    def epoch(self) -> str:
        return self.message.epoch

    @property
    def rules(self):
        return self.message.rules


def _target(server: str) -> tuple[str, bool]:
    """``host:port`` and whether to use TLS, from ``host:port``,
    ``http://host:port`` or ``https://host:port``."""
    if server.startswith("https://"):
        return server[len("https://"):].rstrip("/"), True
    if server.startswith("http://"):
        return server[len("http://"):].rstrip("/"), False
    return server.rstrip("/"), False


def _is_loopback(target: str) -> bool:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_KNOWLEDGE = {"password", "kba"}
_STRONG = {"webauthn", "id_document"}
_SIGNAL_NAME = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")


def context_class(ctx: dict, decision: dict) -> dict:
    """The coarse class of a decision's context, as reports carry it."""
    confidence = ctx["confidence"]
    band = "high" if confidence >= 0.8 else "medium" if confidence >= 0.5 else "low"
    methods = set(ctx["methods"])
    if methods & _STRONG:
        method = "strong"
    elif methods - _KNOWLEDGE:
        method = "possession"
    elif methods:
        method = "knowledge"
    else:
        method = "none"
    exhausted = (decision["effect"] == "review" and decision.get("escalated", False)
                 and ctx["failed_attempts"] > 0)
    return {"confidence": band, "method": method, "handoff": bool(ctx["handoff_from_bot"]),
            "attempts_exhausted": exhausted}


def check_signal_name(name: str) -> None:
    if not (0 < len(name) <= 64 and _SIGNAL_NAME.match(name)):
        raise ValueError(f"bad signal name {name!r}: use dot-separated words of a-z, 0-9 and _ "
                         "(like login.failed), at most 64 bytes")


class Subscriber:
    """One subscription of a channel: the stream, the newest snapshot, acks.

    ``start()`` opens the stream in a background thread; ``wait_for(revision)``
    blocks until a snapshot at least that new is applied; ``decide()`` uses the
    newest snapshot; ``close()`` ends the stream. A stream that breaks is
    reopened (``server`` may name several, comma-separated; the next one is
    tried, after a jittered backoff from 0.1 s to 5 s), with a hello naming
    ``last_applied_revision`` and ``epoch``; ``error`` says why the last one
    ended and ``reconnects`` counts them. Once every server in turn refused
    the token (UNAUTHENTICATED or PERMISSION_DENIED), ``stopped`` says why and
    nothing is retried.
    """

    def __init__(self, server: str, channel: str, namespace: str = "live",
                 subscriber_id: Optional[str] = None, token: Optional[str] = None,
                 last_applied_revision: int = 0, epoch: str = "",
                 stale_after: float = 30.0, ca_cert: Optional[str] = None,
                 insecure: bool = False, wire: Optional[Wire] = None):
        self.targets = [_target(s.strip()) for s in server.split(",") if s.strip()]
        if not self.targets:
            raise SafemodeError("no server given")
        for target, tls in self.targets:
            if token and not tls and not _is_loopback(target) and not insecure:
                raise SafemodeError(
                    f"refusing to send the token in plain text to {target}; "
                    "use https:// (or insecure=True / --insecure if you really mean it)")
        self._next = 0
        self.target, self.tls = self.targets[0]
        self.channel = channel
        self.namespace = namespace or "live"
        self.subscriber_id = subscriber_id or f"python-{uuid.uuid4().hex[:12]}"
        self.token = token
        self.last_applied_revision = last_applied_revision
        self.epoch = epoch
        self.stale_after = stale_after
        self.ca_cert = ca_cert
        self.wire = wire or load_wire()
        self.snapshot: Optional[Snapshot] = None
        # Revisions acked and (revision, reason) rejected, in order.
        self.acked: list[int] = []
        self.rejected: list[tuple[int, str]] = []
        # What the controller of the stream holds: its store history (from
        # its snapshots) and newest revision. Revisions count within one
        # history only.
        self.server_revision = 0
        self.server_epoch: Optional[str] = None
        self.last_contact: Optional[float] = None
        self.error: Optional[str] = None
        self.closed = False
        self._outbox: queue.Queue = queue.Queue()
        self._changed = threading.Condition()
        self._channel = None
        self._call = None
        self._reader: Optional[threading.Thread] = None
        self._reporter: Optional[threading.Thread] = None
        self._closing = threading.Event()
        self.reconnects = 0
        self.stopped: Optional[str] = None
        # Counts since the last report: decisions by (action, effect,
        # revision, context class, stale), and signals by name.
        self._decisions: dict = {}
        self._signals: dict = {}
        self._counts_lock = threading.Lock()
        self._sequence = 0
        # Reports sent and not yet answered: (sequence, decisions, signals,
        # the answer's holder for report_now or None).
        self._unanswered: list = []
        # The stream's replica takes reports (it said so in its header).
        self._reports_taken = False

    # --- the stream ---

    def start(self) -> "Subscriber":
        self._open()
        self._reader = threading.Thread(target=self._run, name=f"safemode-{self.channel}",
                                        daemon=True)
        self._reader.start()
        self._reporter = threading.Thread(target=self._report_loop,
                                          name=f"safemode-report-{self.channel}", daemon=True)
        self._reporter.start()
        return self

    def _open(self) -> None:
        """Opens a stream to the current server and says hello."""
        import grpc

        self.target, self.tls = self.targets[self._next]
        if self.tls:
            roots = Path(self.ca_cert).read_bytes() if self.ca_cert else None
            channel = grpc.secure_channel(
                self.target, grpc.ssl_channel_credentials(root_certificates=roots))
        else:
            channel = grpc.insecure_channel(self.target)
        stub = self.wire.grpc.SubscriptionServiceStub(channel)
        metadata = [("authorization", f"Bearer {self.token}")] if self.token else None
        sub = self.wire.subscription
        outbox: queue.Queue = queue.Queue()
        with self._changed:
            old, old_outbox, old_call = self._channel, self._outbox, self._call
            self._outbox = outbox
            self._channel = channel
            hello = sub.Hello(
                namespace=self.namespace,
                channel=self.channel,
                subscriber_id=self.subscriber_id,
                last_applied_revision=self.last_applied_revision,
                epoch=self.epoch,
            )
        # The old stream's request thread waits on its outbox: end it, or
        # every reconnect leaves a thread behind.
        old_outbox.put(None)
        if old_call is not None:
            old_call.cancel()
        if old is not None:
            old.close()
        outbox.put(sub.SubscribeRequest(hello=hello))
        self._call = stub.Subscribe(self._requests(outbox), metadata=metadata)

    def _run(self) -> None:
        """Reads stream after stream until closed or stopped for good."""
        import grpc

        backoff = BACKOFF_MIN
        refusals = 0
        while True:
            opened = time.monotonic()
            code, heard = self._read()
            # A stream that said something and lasted is a good one: the
            # next try is quick. One that ends at once keeps backing off.
            if heard and time.monotonic() - opened >= BACKOFF_MAX:
                backoff = BACKOFF_MIN
            with self._changed:
                self._reports_taken = False
                unanswered, self._unanswered = self._unanswered, []
                if self.closed:
                    return
            # Reports of a broken stream go unanswered: their counts go with
            # the next report (the controller may have counted some: a count
            # may be reported twice, never lost), and whoever waits is told.
            for _, decisions, signals, holder in unanswered:
                self._carry(decisions, signals)
                if holder is not None:
                    holder.put(("lost", "the stream ended before the controller answered; "
                                        "the counts go with the next report"))
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                refusals += 1
            else:
                refusals = 0
            if refusals >= len(self.targets):
                with self._changed:
                    self.stopped = self.error
                    self._changed.notify_all()
                return
            pause = backoff * (0.5 + random.random() / 2)
            backoff = min(backoff * 2, BACKOFF_MAX)
            if self._closing.wait(pause):
                return
            self._next = (self._next + 1) % len(self.targets)
            try:
                self._open()
            except Exception as e:  # noqa: BLE001 - any failure to open is retried
                with self._changed:
                    self.error = f"cannot open a stream to {self.target}: {e}"
                continue
            with self._changed:
                self.reconnects += 1
                self._changed.notify_all()

    def _send(self, request) -> None:
        self._outbox.put(request)

    @staticmethod
    def _requests(outbox: queue.Queue) -> Iterator:
        while True:
            request = outbox.get()
            if request is None:
                return
            yield request

    def _read(self):
        """Reads the current stream to its end; returns its status code and
        whether it said anything."""
        import grpc

        code = None
        heard = False
        try:
            # A replica says in its response header that it takes reports;
            # none is sent to one that does not (an older version ends the
            # stream on a message it does not know).
            metadata = dict(self._call.initial_metadata() or ())
            with self._changed:
                self._reports_taken = REPORTS_HEADER in metadata
            for response in self._call:
                heard = True
                which = response.WhichOneof("message")
                if which == "snapshot":
                    self._on_snapshot(response.snapshot)
                elif which == "heartbeat":
                    with self._changed:
                        self.last_contact = time.monotonic()
                        self.server_revision = response.heartbeat.revision
                        self._changed.notify_all()
                elif which == "report_answer":
                    self._on_answer(response.report_answer)
            error = "the controller ended the stream"
        except grpc.RpcError as e:
            code = e.code()
            error = f"{code.name}: {e.details()}"
        with self._changed:
            if not self.closed:
                self.error = error
            self._changed.notify_all()
        return code, heard

    def _problem(self, snapshot) -> Optional[str]:
        """Why ``snapshot`` cannot be used, or None."""
        if snapshot.schema_version != SCHEMA_VERSION:
            return (f"schema_version: unknown snapshot schema version {snapshot.schema_version} "
                    f"(this client reads {SCHEMA_VERSION}); upgrade the client")
        if snapshot.namespace != self.namespace:
            return f"namespace: '{snapshot.namespace}' is not the subscribed '{self.namespace}'"
        if snapshot.channel != self.channel:
            return f"channel: '{snapshot.channel}' is not the subscribed '{self.channel}'"
        if snapshot.revision < 0:
            return "revision: is negative"
        if not snapshot.HasField("rules"):
            return "rules: is missing"
        try:
            check_rules(snapshot.rules)
        except ValueError as e:
            return str(e)
        return None

    def _on_snapshot(self, snapshot) -> None:
        sub = self.wire.subscription
        problem = self._problem(snapshot)
        with self._changed:
            self.last_contact = time.monotonic()
            self.server_revision = snapshot.revision
            self.server_epoch = snapshot.epoch
            if problem is not None:
                # Keep the previous snapshot: a policy we cannot read must not
                # replace one we can.
                self.rejected.append((snapshot.revision, problem))
                self._send(sub.SubscribeRequest(reject=sub.Reject(
                    revision=snapshot.revision, reason=problem)))
            else:
                current = self.snapshot
                same_history = current is not None and current.epoch == snapshot.epoch
                if same_history and snapshot.revision < current.revision:
                    # Never go backwards within one store history; say why.
                    reason = (f"revision {snapshot.revision} is older than the applied "
                              f"revision {current.revision}")
                    self.rejected.append((snapshot.revision, reason))
                    self._send(sub.SubscribeRequest(reject=sub.Reject(
                        revision=snapshot.revision, reason=reason)))
                    self._changed.notify_all()
                    return
                self.snapshot = Snapshot(snapshot, time.monotonic())
                self.last_applied_revision = snapshot.revision
                self.epoch = snapshot.epoch
                self.acked.append(snapshot.revision)
                self._send(sub.SubscribeRequest(ack=sub.Ack(revision=snapshot.revision)))
            self._changed.notify_all()

    # --- reports ---

    def signal(self, name: str, count: int = 1) -> None:
        """Counts ``count`` of the signal ``name`` (login.failed, ...) for the
        next report. At most 62 names per report interval; counts of further
        names are dropped."""
        check_signal_name(name)
        if name.startswith("safemode."):
            raise ValueError(f"signal {name!r} is under safemode., which the client counts "
                             "itself; give your own name, like login.failed")
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._counts_lock:
            if name in self._signals or len(self._signals) < MAX_SIGNALS - 2:
                self._signals[name] = self._signals.get(name, 0) + count

    def _count(self, action: str, ctx: dict, decision: dict) -> None:
        if action.startswith("bot.intent."):
            action = "bot.intent"
        elif action not in KNOWN_ACTIONS:
            return
        c = context_class(ctx, decision)
        key = (action, decision["effect"], decision["revision"] or 0, c["confidence"],
               c["method"], c["handoff"], c["attempts_exhausted"], decision["stale"])
        with self._counts_lock:
            self._decisions[key] = self._decisions.get(key, 0) + 1
            own = None
            if c["attempts_exhausted"]:
                own = "safemode.attempts_exhausted"
            elif decision["effect"] == "step_up" and ctx["failed_attempts"] > 0:
                own = "safemode.step_up_failed"
            if own is not None:
                self._signals[own] = self._signals.get(own, 0) + 1

    def _carry(self, decisions: dict, signals: dict) -> None:
        """Puts counts back for the next report."""
        with self._counts_lock:
            for key, n in decisions.items():
                self._decisions[key] = self._decisions.get(key, 0) + n
            for name, n in signals.items():
                self._signals[name] = self._signals.get(name, 0) + n

    def _report(self, holder: Optional[queue.Queue] = None) -> bool:
        """Sends what was counted (if anything, or if ``holder`` waits), on a
        stream whose replica takes reports; otherwise the counts wait."""
        sub = self.wire.subscription
        with self._changed:
            taken = self._reports_taken
        if not taken:
            if holder is not None:
                holder.put(("refused", "no stream to a controller that takes reports now; "
                                       "the counts are kept for the next report"))
            return False
        with self._counts_lock:
            decisions, self._decisions = self._decisions, {}
            signals, self._signals = self._signals, {}
            # The biggest rows go; the rest wait for the next report.
            rows = sorted(decisions.items(), key=lambda kv: -kv[1])
            for key, n in rows[MAX_DECISION_ROWS:]:
                self._decisions[key] = n
            decisions = dict(rows[:MAX_DECISION_ROWS])
        if not decisions and not signals and holder is None:
            return False
        report = sub.Report()
        for (action, effect, revision, band, method, handoff, exhausted, stale), n \
                in decisions.items():
            report.decisions.append(sub.DecisionCount(
                action=action, effect=effect, revision=revision, stale=stale, count=n,
                context=sub.ReportedClass(confidence=band, method=method, handoff=handoff,
                                          attempts_exhausted=exhausted)))
        for name, n in signals.items():
            report.signals.append(sub.SignalCount(name=name, count=n))
        # Numbered and queued together: reports go in the order of their
        # sequence, which answers rely on.
        with self._changed:
            self._sequence += 1
            report.sequence = self._sequence
            self._unanswered.append((report.sequence, decisions, signals, holder))
            self._send(sub.SubscribeRequest(report=report))
        return True

    def _on_answer(self, answer) -> None:
        with self._changed:
            found = next((u for u in self._unanswered if u[0] == answer.sequence), None)
            if found is None:
                return
            # Answers come in order: an earlier report still waiting lost its
            # answer, and its counts go with the next report.
            lost = [u for u in self._unanswered if u[0] < answer.sequence]
            self._unanswered = [u for u in self._unanswered if u[0] > answer.sequence]
        for _, old_decisions, old_signals, old_holder in lost:
            self._carry(old_decisions, old_signals)
            if old_holder is not None:
                old_holder.put(("lost", "the controller's answer to the report was lost; "
                                        "the counts go with the next report"))
        _, decisions, signals, holder = found
        if not answer.accepted and answer.retry_after_seconds > 0:
            # Too soon: the counts go with the next report.
            self._carry(decisions, signals)
        if answer.accepted and answer.left_out > 0:
            # Taken, but some rows did not fit the controller's book.
            verdict = ("partial", answer.reason)
        elif answer.accepted:
            verdict = ("accepted", "")
        else:
            verdict = ("refused", answer.reason)
        if holder is not None:
            holder.put(verdict)

    def _report_loop(self) -> None:
        while not self._closing.wait(REPORT_EVERY):
            self._report()

    def report_now(self, timeout: float = 10.0) -> tuple:
        """Sends what was counted now and waits for the answer:
        ``("accepted", "")``, ``("partial", reason)`` (taken, but rows were
        left out) or ``("refused", reason)``; raises SafemodeError when none
        comes in time or the stream ended first."""
        holder: queue.Queue = queue.Queue()
        self._report(holder)
        try:
            answer = holder.get(timeout=timeout)
        except queue.Empty:
            raise SafemodeError(f"the controller did not answer the report within {timeout}s")
        if answer[0] == "lost":
            raise SafemodeError(answer[1])
        return answer

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()
        self._closing.set()
        self._outbox.put(None)
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> "Subscriber":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading ---

    def wait_for(self, min_revision: int = 0, timeout: float = 30.0) -> Snapshot:
        """Blocks until a snapshot at ``min_revision`` or newer is applied."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                s = self.snapshot
                if s is not None and s.revision >= min_revision:
                    return s
                if self.stopped is not None:
                    raise SafemodeError(f"subscription of {self.channel} stopped: {self.stopped}")
                left = deadline - time.monotonic()
                if left <= 0:
                    have = "no snapshot" if s is None else f"revision {s.revision}"
                    last = f"; last error: {self.error}" if self.error else ""
                    raise SafemodeError(
                        f"no snapshot at revision {min_revision} or newer for {self.channel} "
                        f"within {timeout}s (have {have}; rejected: {self.rejected or 'none'}{last})")
                self._changed.wait(left)

    def stale(self) -> bool:
        """Whether the policy may be out of date: none yet, no contact within
        ``stale_after``, or the controller holds something newer: a newer
        revision, or another store history."""
        with self._changed:
            return (self.snapshot is None or self.last_contact is None
                    or time.monotonic() - self.last_contact > self.stale_after
                    or (self.server_epoch is not None
                        and self.server_epoch != self.snapshot.epoch)
                    or self.server_revision > self.snapshot.revision)

    def decide(self, action: str, ctx: Optional[dict] = None) -> dict:
        """Decides with the newest snapshot (allow and stale without one), with
        the snapshot's ``revision`` and ``stale``."""
        s = self.snapshot
        ctx = context(ctx)
        if s is None:
            decision = {"effect": "allow", "reasons": [], "customer_message": None,
                        "agent_script": None, "revision": None, "stale": True}
        else:
            decision = {**decide(s.rules, action, ctx), "revision": s.revision,
                        "stale": self.stale()}
        self._count(action, ctx, decision)
        return decision


# === Command line ===


def _answer(subscriber: Subscriber, cases: list, min_revision: int, timeout: float,
            report: bool = False) -> dict:
    snapshot = subscriber.wait_for(min_revision, timeout)
    decisions = []
    for case in cases:
        ctx = context(case.get("context"))
        decision = decide(snapshot.rules, case["action"], ctx)
        decisions.append(decision)
        if report:
            subscriber._count(case["action"], ctx, {**decision, "revision": snapshot.revision,
                                                    "stale": subscriber.stale()})
    result = {
        "namespace": subscriber.namespace,
        "channel": subscriber.channel,
        "subscriber_id": subscriber.subscriber_id,
        "revision": snapshot.revision,
        "epoch": snapshot.epoch,
        "decisions": decisions,
        "reconnects": subscriber.reconnects,
    }
    if report:
        outcome, reason = subscriber.report_now(timeout)
        result["report"] = outcome if outcome == "accepted" else f"{outcome}: {reason}"
    return result


def _load_cases(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        cases = json.load(f)
    if not isinstance(cases, list) or not all(isinstance(c, dict) and "action" in c for c in cases):
        raise SafemodeError(f"{path}: expected a JSON list of {{\"action\": ..., \"context\": {{...}}}}")
    return cases


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Subscribe to a safemode controller for one channel, wait for a policy "
                    "revision, decide a file of cases with it and print one JSON object.")
    parser.add_argument("--server", default=os.environ.get("SAFEMODE_SERVER", "127.0.0.1:7700"),
                        help="controller: host:port, http://host:port or https://host:port; "
                             "several, comma-separated, are tried in turn when a stream breaks")
    parser.add_argument("--channel", required=True, help="the channel to subscribe as, e.g. web")
    parser.add_argument("--namespace", default="live", help="live (default) or drill-<id>")
    parser.add_argument("--subscriber-id", help="id shown in `safemode status` (default: python-<random>)")
    parser.add_argument("--token", default=os.environ.get("SAFEMODE_TOKEN"),
                        help="bearer token (default: $SAFEMODE_TOKEN)")
    parser.add_argument("--ca-cert", help="PEM CA certificate for an https:// controller")
    parser.add_argument("--insecure", action="store_true",
                        help="allow sending the token in plain text to a non-loopback address")
    parser.add_argument("--cases", help="JSON list of {\"action\": ..., \"context\": {...}}")
    parser.add_argument("--min-revision", type=int, default=0,
                        help="wait for a snapshot at this revision or newer")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for that snapshot (default 30)")
    parser.add_argument("--stay", action="store_true",
                        help="after answering, stay subscribed (acking new snapshots) and answer "
                             "each stdin line {\"min_revision\": N, \"cases\": [...]} the same way; "
                             "exit at end of input")
    parser.add_argument("--report", action="store_true",
                        help="count each answer's decisions and report them to the controller at "
                             "once (the answer says whether it was accepted)")
    parser.add_argument("--gen-dir", help="generate the gRPC code here (default: a temporary directory)")
    parser.add_argument("--proto-dir", default=str(DEFAULT_PROTO_DIR), help="the proto/ directory")
    args = parser.parse_args(argv)
    if args.cases is None and not args.stay:
        parser.error("give --cases, --stay, or both")

    try:
        import grpc  # noqa: F401
    except ImportError as e:
        print(f"safemode_client: grpcio is missing ({e}); {INSTALL_HINT}", file=sys.stderr)
        return 1
    try:
        wire = load_wire(args.gen_dir, args.proto_dir)
        subscriber = Subscriber(args.server, args.channel, args.namespace, args.subscriber_id,
                                args.token, ca_cert=args.ca_cert, insecure=args.insecure,
                                wire=wire)
        with subscriber:
            if args.cases is not None:
                result = _answer(subscriber, _load_cases(args.cases), args.min_revision,
                                 args.timeout, args.report)
                print(json.dumps(result), flush=True)
            if args.stay:
                for line in sys.stdin:
                    if not line.strip():
                        continue
                    request = json.loads(line)
                    result = _answer(subscriber, request["cases"],
                                     int(request.get("min_revision", 0)), args.timeout,
                                     args.report)
                    print(json.dumps(result), flush=True)
    except SafemodeError as e:
        print(f"safemode_client: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
