"""A small OTLP/gRPC receiver for tests/it/telemetry.rs.

Serves the OTLP TraceService (and a MetricsService that accepts and drops
what it gets) on 127.0.0.1 at a free port, prints the port on the first
line of stdout, and appends every span it receives as one JSON line to the
file named by its first argument: trace and span ids in hex, the parent's,
the span's name and kind, and the resource's service name and instance id.
It stops when its standard input closes (the test dropped it) or on SIGTERM.

Built on the opentelemetry-proto and grpcio packages (scripts/test installs
them).
"""

import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)


def attribute(attributes, key):
    for kv in attributes:
        if kv.key == key:
            return kv.value.string_value
    return None


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()

    def Export(self, request, context):
        lines = []
        for resource_spans in request.resource_spans:
            resource = resource_spans.resource.attributes
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    lines.append(
                        json.dumps(
                            {
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "name": span.name,
                                "kind": span.kind,
                                "service": attribute(resource, "service.name"),
                                "instance": attribute(resource, "service.instance.id"),
                            }
                        )
                    )
        with self.lock, open(self.path, "a", encoding="utf-8") as out:
            for line in lines:
                out.write(line + "\n")
        return trace_service_pb2.ExportTraceServiceResponse()


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request, context):
        return metrics_service_pb2.ExportMetricsServiceResponse()


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: otlp_receiver.py SPANS.jsonl")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(sys.argv[1]), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    # Until the test closes our stdin (or kills us).
    sys.stdin.read()
    server.stop(0)


if __name__ == "__main__":
    main()
