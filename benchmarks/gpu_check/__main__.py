"""`python -m benchmarks.gpu_check`: see the package's docstring (or --help)."""

from benchmarks.gpu_check.cli import main
from fasttrain.run import exit_now

if __name__ == "__main__":
    exit_now(main())  # past torch's teardown, which can change a finished run's exit code (fasttrain.run.exit_now)
