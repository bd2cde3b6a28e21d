"""Exit codes of the `medfdd` command line (documented in docs/troubleshooting.md); one place for both CLIs."""

from __future__ import annotations

OK = 0
PRIVACY_VIOLATION = 1  # `medfdd audit` found an empirical epsilon bound above the accounted one
USAGE = 2  # argparse's code for an unknown command, flag or bad flag value
RUNTIME_ERROR = 3  # a typed MedfddError (config, data, budget, artifact ...) or an unexpected failure
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), the shell's convention
