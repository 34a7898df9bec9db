"""Parses an OpenMetrics exposition from stdin with a strict parser (PyPI
prometheus-client's openmetrics.parser, which refuses what the specification refuses:
a missing `# EOF`, samples out of their family, bad suffixes, bad escaping, counters
without `_total`, histograms without `+Inf` or with unordered buckets).

Prints one line per family, `name type samples`, so the caller can check what was
read; exits 1 with the parser's message on the first error."""

import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main() -> int:
    text = sys.stdin.read()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError and friends: report any
        print(f"not OpenMetrics: {e}", file=sys.stderr)
        return 1
    for f in families:
        print(f"{f.name} {f.type} {len(f.samples)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
