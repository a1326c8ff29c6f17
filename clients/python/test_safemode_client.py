"""Tests of the protocol edges of the Python subscriber, against a scripted
SubscriptionService in this process: the hello, the bearer token, acks,
rejects that keep the previous snapshot, and heartbeats as freshness.

Decisions are checked against the Rust client with a real server in
tests/it/python_client.rs. Run: python3 -m unittest -v test_safemode_client
"""

import os
import queue
import threading
import time
import unittest
from concurrent import futures
from unittest import mock

# Quiet grpc core's notes about streams cancelled at the end of each test.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
import grpc  # noqa: E402

import safemode_client as sc  # noqa: E402

WIRE = sc.load_wire()
SUB = WIRE.subscription
POLICY = WIRE.policy
# The names of the scripted controller's server threads.
SERVER_THREADS = "scripted-controller"


def snapshot(revision, schema_version=1, namespace="live", channel="web", epoch="e1"):
    s = SUB.Snapshot(schema_version=schema_version, namespace=namespace, channel=channel,
                     revision=revision, epoch=epoch)
    s.issued_at.seconds = 1_700_000_000
    entry = s.rules.actions["account.*"].base
    entry.effect.deny.alternative = "use the app"
    entry.activation_ids.append(f"act_rev{revision}")
    return s


class ScriptedService(WIRE.grpc.SubscriptionServiceServicer):
    """Sends what a test puts in ``outbox`` and records what the client sends."""

    def __init__(self):
        self.outbox = queue.Queue()
        self.inbox = queue.Queue()
        self.metadata = None
        # Says it takes reports, as a replica of this version does.
        self.takes_reports = True

    def Subscribe(self, request_iterator, context):
        self.metadata = dict(context.invocation_metadata())
        if self.takes_reports:
            context.send_initial_metadata(((sc.REPORTS_HEADER, "1"),))

        def read():
            try:
                for request in request_iterator:
                    self.inbox.put(request)
            except grpc.RpcError:
                pass  # the client went away

        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            try:
                message = self.outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if message is None:
                return
            yield message

    def received(self):
        """The next message from the client (fails after 10 s)."""
        return self.inbox.get(timeout=10)


class SubscriberProtocolTest(unittest.TestCase):
    def setUp(self):
        # The scripted controller answers the reports a test asks for: no
        # background report (every 10 s) in the middle of a test, however
        # slow the machine.
        every, sc.REPORT_EVERY = sc.REPORT_EVERY, 3600.0
        self.addCleanup(setattr, sc, "REPORT_EVERY", every)
        self.service = ScriptedService()
        self.server = grpc.server(futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix=SERVER_THREADS))
        WIRE.grpc.add_SubscriptionServiceServicer_to_server(self.service, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{port}"

    def tearDown(self):
        self.service.outbox.put(None)
        self.server.stop(grace=None)

    def subscriber(self, **kwargs):
        s = sc.Subscriber(self.address, "web", subscriber_id="py-test", wire=WIRE, **kwargs)
        s.start()
        self.addCleanup(s.close)
        return s

    def send(self, message):
        if message.DESCRIPTOR.name == "Snapshot":
            self.service.outbox.put(SUB.SubscribeResponse(snapshot=message))
        else:
            self.service.outbox.put(SUB.SubscribeResponse(heartbeat=message))

    def test_hello_carries_the_subscription_and_the_token(self):
        self.subscriber(token="s3cret", last_applied_revision=7, epoch="e1")
        hello = self.service.received().hello
        self.assertEqual(
            (hello.namespace, hello.channel, hello.subscriber_id, hello.last_applied_revision,
             hello.epoch),
            ("live", "web", "py-test", 7, "e1"))
        self.assertEqual(self.service.metadata.get("authorization"), "Bearer s3cret")

    def test_acks_each_applied_snapshot_and_rejects_what_it_cannot_use(self):
        s = self.subscriber()
        self.service.received()  # hello
        self.send(snapshot(1))
        self.assertEqual(self.service.received().ack.revision, 1)
        for bad, why in [(snapshot(2, schema_version=2), "schema_version"),
                         (snapshot(3, namespace="drill-x"), "namespace"),
                         (snapshot(4, channel="ivr"), "channel")]:
            self.send(bad)
            reject = self.service.received().reject
            self.assertEqual(reject.revision, bad.revision)
            self.assertTrue(reject.reason.startswith(why), reject.reason)
            # The previous snapshot stays in force.
            self.assertEqual(s.wait_for(1, timeout=1).revision, 1)
            self.assertEqual(s.decide("account.password_reset")["reasons"], ["act_rev1"])
        self.send(snapshot(5))
        self.assertEqual(self.service.received().ack.revision, 5)
        self.assertEqual(s.wait_for(5, timeout=10).revision, 5)
        self.assertEqual(s.acked, [1, 5])
        self.assertEqual([r for r, _ in s.rejected], [2, 3, 4])

    def test_rules_it_cannot_evaluate_are_rejected(self):
        s = self.subscriber()
        self.service.received()
        broken = snapshot(1)
        broken.rules.actions["payment.*"].conditional.add().effect.allow.SetInParent()
        self.send(broken)
        reject = self.service.received().reject
        self.assertIn("conditional entry without a condition", reject.reason)
        self.assertIsNone(s.snapshot)
        self.assertTrue(s.decide("payment.refund")["stale"])

    def test_never_goes_back_within_one_history_but_follows_a_new_one(self):
        s = self.subscriber()
        self.service.received()
        self.send(snapshot(5))
        self.service.received()
        self.send(snapshot(4))
        older = self.service.received().reject
        self.assertEqual(older.revision, 4)
        self.assertIn("older than the applied revision 5", older.reason)
        self.send(snapshot(2, epoch="e2"))  # the store was replaced
        self.assertEqual(self.service.received().ack.revision, 2)
        self.assertEqual((s.snapshot.revision, s.snapshot.epoch), (2, "e2"))
        self.assertEqual(s.acked, [5, 2])

    def test_a_rejected_snapshot_of_a_new_history_makes_it_stale(self):
        s = self.subscriber(stale_after=60)
        self.service.received()
        self.send(snapshot(5))
        self.service.received()
        self.assertFalse(s.stale())
        replaced = snapshot(1, epoch="e2")
        replaced.schema_version = 99
        self.send(replaced)
        self.assertEqual(self.service.received().reject.revision, 1)
        # Revision 1 is below 5, but of another history: the policy held
        # is not the controller's.
        self.assertTrue(s.stale())

    def test_heartbeats_count_as_contact_and_a_newer_revision_makes_it_stale(self):
        s = self.subscriber(stale_after=60)
        self.service.received()
        self.send(snapshot(3))
        self.service.received()
        self.assertFalse(s.stale())
        self.send(SUB.Heartbeat(revision=3))
        self.send(SUB.Heartbeat(revision=4))
        deadline = threading.Event()
        for _ in range(200):
            if s.server_revision == 4:
                break
            deadline.wait(0.05)
        self.assertEqual(s.server_revision, 4)
        self.assertTrue(s.stale())
        self.assertTrue(s.decide("order.view")["stale"])

    def test_a_broken_stream_is_reopened_with_the_revision_held(self):
        s = self.subscriber()
        self.service.received()  # hello
        self.send(snapshot(4))
        self.assertEqual(self.service.received().ack.revision, 4)
        # The controller ends the stream. The client counts the reconnect
        # once its new stream is open, which may be just after the
        # controller has its hello: `reconnect` waits for the count.
        hello = self.reconnect(s, 1)
        self.assertEqual((hello.last_applied_revision, hello.epoch), (4, "e1"))
        self.assertEqual(s.reconnects, 1)
        self.assertEqual(s.error, "the controller ended the stream")
        # The new stream goes on where the old one ended.
        self.send(snapshot(5))
        self.assertEqual(self.service.received().ack.revision, 5)
        self.assertEqual(s.wait_for(5, timeout=10).revision, 5)

    def test_decisions_and_signals_are_reported_and_answered(self):
        s = self.subscriber()
        self.service.received()
        self.send(snapshot(3))
        self.service.received()
        s.wait_for(3, timeout=10)
        for _ in range(3):
            s.decide("account.email_change", {"confidence": 0.9, "methods": ["webauthn"]})
        s.decide("bot.intent.reset_password", {"handoff_from_bot": True})
        s.decide("not.an_action")  # not reported: the controller knows no such action
        s.signal("login.failed", 5)
        with self.assertRaises(ValueError):
            s.signal("Login Failed")
        answer = {}

        def answer_it():
            report = self.service.received().report
            answer["report"] = report
            self.service.outbox.put(SUB.SubscribeResponse(report_answer=SUB.ReportAnswer(
                sequence=report.sequence, accepted=False, reason="too soon", retry_after_seconds=8)))

        threading.Thread(target=answer_it, daemon=True).start()
        self.assertEqual(s.report_now(timeout=10), ("refused", "too soon"))
        report = answer["report"]
        rows = sorted((d.action, d.effect, d.revision, d.context.confidence, d.context.method,
                       d.context.handoff, d.stale, d.count) for d in report.decisions)
        self.assertEqual(rows, [
            ("account.email_change", "deny", 3, "high", "strong", False, False, 3),
            ("bot.intent", "allow", 3, "low", "none", True, False, 1),
        ])
        self.assertEqual([(x.name, x.count) for x in report.signals], [("login.failed", 5)])
        # Refused as too soon: the counts go with the next report.
        threading.Thread(target=lambda: (answer.update(next=self.service.received().report),
                                         self.service.outbox.put(SUB.SubscribeResponse(
                                             report_answer=SUB.ReportAnswer(
                                                 sequence=answer["next"].sequence,
                                                 accepted=True)))),
                         daemon=True).start()
        self.assertEqual(s.report_now(timeout=10), ("accepted", ""))
        self.assertEqual(sum(d.count for d in answer["next"].decisions), 4)
        self.assertEqual([(x.name, x.count) for x in answer["next"].signals],
                         [("login.failed", 5)])

    def start_at(self, revision, **kwargs):
        """A subscriber that applied ``revision``; the hello and ack are read."""
        s = self.subscriber(**kwargs)
        self.service.received()
        self.send(snapshot(revision))
        self.assertEqual(self.service.received().ack.revision, revision)
        s.wait_for(revision, timeout=10)
        return s

    @staticmethod
    def report_soon(s):
        """Asks for a report from another thread; its answer is not awaited
        (the stream may close first)."""
        def ask():
            try:
                s.report_now(timeout=10)
            except sc.SafemodeError:
                pass

        threading.Thread(target=ask, daemon=True).start()

    def reconnect(self, s, reconnects):
        """Ends the stream; returns the new stream's hello once it came."""
        self.service.outbox.put(None)
        hello = self.service.received().hello
        deadline = time.monotonic() + 10
        while s.reconnects < reconnects:
            self.assertLess(time.monotonic(), deadline, "the stream is reopened")
            time.sleep(0.01)
        return hello

    def test_a_controller_that_takes_no_reports_is_sent_none_and_the_counts_wait(self):
        self.service.takes_reports = False
        s = self.start_at(3)
        s.decide("account.email_change")
        outcome, reason = s.report_now(timeout=10)
        self.assertEqual(outcome, "refused")
        self.assertIn("no stream to a controller that takes reports", reason)
        # A replica that takes reports: the counts go to it. Nothing was sent
        # before: the next message after the old stream's ack is the hello.
        self.service.takes_reports = True
        self.reconnect(s, 1)
        self.send(snapshot(3))
        self.assertEqual(self.service.received().ack.revision, 3)
        self.report_soon(s)
        report = self.service.received().report
        self.assertEqual(sum(d.count for d in report.decisions), 1)

    def test_counts_of_a_report_lost_with_its_stream_go_with_the_next(self):
        s = self.start_at(3)
        for _ in range(4):
            s.decide("account.email_change")
        s.signal("login.failed", 2)
        lost = {}

        def ask():
            try:
                s.report_now(timeout=10)
            except sc.SafemodeError as e:
                lost["why"] = str(e)

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        self.service.received()  # the report, never answered
        self.reconnect(s, 1)
        asking.join(timeout=10)
        self.assertIn("the stream ended before the controller answered", lost["why"])
        self.send(snapshot(3))
        self.assertEqual(self.service.received().ack.revision, 3)
        s.decide("account.email_change")
        self.report_soon(s)
        report = self.service.received().report
        self.assertEqual(sum(d.count for d in report.decisions), 5)
        self.assertEqual([(x.name, x.count) for x in report.signals], [("login.failed", 2)])

    def test_a_report_with_rows_left_out_says_so(self):
        s = self.start_at(3)
        s.signal("login.failed", 1)
        threading.Thread(target=lambda: (
            self.service.outbox.put(SUB.SubscribeResponse(report_answer=SUB.ReportAnswer(
                sequence=self.service.received().report.sequence, accepted=True, left_out=1,
                reason="1 of its 1 rows were left out")))), daemon=True).start()
        self.assertEqual(s.report_now(timeout=10), ("partial", "1 of its 1 rows were left out"))
        with self.assertRaises(ValueError):
            s.signal("safemode.step_up_failed")

    def test_reconnects_leave_no_thread_behind(self):
        # The scripted controller's pool starts a thread when a stream
        # arrives while its others are busy, and keeps it: those are not
        # the client's.
        def outside_the_pool():
            return [t.name for t in threading.enumerate()
                    if not t.name.startswith(SERVER_THREADS)]
        s = self.start_at(1)
        baseline = outside_the_pool()
        for n in range(1, 6):
            self.reconnect(s, n)
            self.send(snapshot(1))
            self.assertEqual(self.service.received().ack.revision, 1)
        deadline = time.monotonic() + 10
        while len(outside_the_pool()) > len(baseline):
            self.assertLess(time.monotonic(), deadline,
                            f"threads {outside_the_pool()}, before the reconnects {baseline}")
            time.sleep(0.05)

    def test_every_channel_a_reconnect_replaces_is_closed(self):
        # A channel left open leaves no thread once its call has ended
        # (grpc shares the socket too), so the channels are counted.
        made = []
        real = grpc.insecure_channel

        def recorded(*args, **kwargs):
            channel = real(*args, **kwargs)
            kept = {"closed": False}
            close = channel.close

            def closing():
                kept["closed"] = True
                close()
            channel.close = closing
            made.append(kept)
            return channel
        with mock.patch.object(grpc, "insecure_channel", recorded):
            s = self.start_at(1)
            for n in range(1, 4):
                self.reconnect(s, n)
                self.send(snapshot(1))
                self.assertEqual(self.service.received().ack.revision, 1)
        self.assertEqual(len(made), s.reconnects + 1)
        self.assertEqual([m["closed"] for m in made], [True] * s.reconnects + [False])
        s.close()
        self.assertTrue(made[-1]["closed"], "close() closes the channel in use")

    def test_a_token_never_goes_in_plain_text_off_the_machine(self):
        with self.assertRaises(sc.SafemodeError):
            sc.Subscriber("10.1.2.3:7700", "web", token="t", wire=WIRE)
        sc.Subscriber("http://localhost:7700", "web", token="t", wire=WIRE)
        sc.Subscriber("10.1.2.3:7700", "web", token="t", insecure=True, wire=WIRE)


class DecideTest(unittest.TestCase):
    """Corners the real modes do not reach; the rest is compared with Rust."""

    def rules(self, *entries):
        rules = POLICY.ChannelRules()
        for key, build in entries:
            build(rules.actions[key])
        return rules

    def test_lookup_order(self):
        def deny(text):
            def build(policy):
                policy.base.effect.deny.alternative = text
            return build

        rules = self.rules(("*", deny("any")), ("account.*", deny("account")),
                           ("account.recovery", deny("exact")), ("bot.intent.*", deny("intent")))
        self.assertEqual(sc.decide(rules, "account.recovery")["alternative"], "exact")
        self.assertEqual(sc.decide(rules, "account.mfa_reset")["alternative"], "account")
        self.assertEqual(sc.decide(rules, "bot.intent.x")["alternative"], "intent")
        self.assertEqual(sc.decide(rules, "order.view")["alternative"], "any")
        self.assertEqual(sc.decide(POLICY.ChannelRules(), "order.view"),
                         {"effect": "allow", "reasons": [], "customer_message": None,
                          "agent_script": None})

    def test_read_only_keeps_the_earliest_time_and_route_with_no_channel_denies(self):
        def build(policy):
            policy.base.effect.read_only.as_of.seconds = 200
            later = policy.conditional.add()
            later.when.amount_over = 10
            later.effect.read_only.as_of.seconds = 100
            later.effect.read_only.as_of.nanos = 500_000_000

        rules = self.rules(("order.view", build))
        self.assertEqual(sc.decide(rules, "order.view", {"amount": 5})["as_of"],
                         "1970-01-01T00:03:20Z")
        # No amount: the amount condition holds (the stricter rule applies).
        self.assertEqual(sc.decide(rules, "order.view")["as_of"], "1970-01-01T00:01:40.5Z")

        def route(policy):
            policy.base.effect.route.to_channels.extend(["web"])
            other = policy.conditional.add()
            other.when.handoff_from_bot = True
            other.effect.route.to_channels.extend(["mobile"])

        rules = self.rules(("payment.payout", route))
        self.assertEqual(sc.decide(rules, "payment.payout")["to"], ["web"])
        self.assertEqual(
            {k: v for k, v in sc.decide(rules, "payment.payout",
                                        {"handoff_from_bot": True}).items() if k != "reasons"},
            {"effect": "deny", "alternative": None, "customer_message": None,
             "agent_script": None})


if __name__ == "__main__":
    unittest.main()
