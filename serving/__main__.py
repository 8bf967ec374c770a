"""``python -m serving``: list the serving stage's commands."""

import sys

USAGE = """serving stage commands (console script, or the same as python -m):
  tlp-serve     python -m serving.server    development server speaking TF Serving's gRPC + REST APIs
  tlp-client    python -m serving.client    classify images, show metadata or status over gRPC
  tlp-loadtest  python -m serving.loadtest  bounded load test: throughput, p50/p95/p99, errors by code
  tlp-release   python -m serving.release   promote a version to canary/stable, roll stable back
  tlp-predict   python -m serving.batch     batch predictions offline: a Beam job with RunInference
Each takes --help. Config for the real tensorflow/serving: serving/config/ (see its README.md)."""


def main() -> int:
    print(USAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
