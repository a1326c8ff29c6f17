"""Parses the Prometheus text format on stdin with prometheus_client's own
parser (tests/it/telemetry.rs runs it on a scrape of /metrics) and prints
the families as JSON: {name: {"type": ..., "samples": [{"name", "labels",
"value"}]}}. A text the parser refuses exits non-zero with its error.
"""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main():
    families = {}
    for family in text_string_to_metric_families(sys.stdin.read()):
        families[family.name] = {
            "type": family.type,
            "samples": [
                {"name": s.name, "labels": dict(s.labels), "value": s.value}
                for s in family.samples
            ],
        }
    json.dump(families, sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main()
