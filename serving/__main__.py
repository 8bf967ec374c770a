"""``python -m serving``: list the serving stage's commands."""

import sys

USAGE = """serving stage commands:
  python -m serving.server    development server speaking TF Serving's gRPC + REST APIs  (tlp-serve)
  python -m serving.client    classify images, show metadata or status over gRPC          (tlp-client)
  python -m serving.loadtest  bounded load test: throughput, p50/p95/p99, errors by code  (tlp-loadtest)
Each takes --help. Config for the real tensorflow/serving: serving/config/ (see its README.md)."""


def main() -> int:
    print(USAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
