#!/usr/bin/env bash
# Create .venv with the pinned dependencies and the project installed (editable).
# Usage: bash scripts/setup.sh [--dev] [--torchtitan] [--torch-checkpointing]
#   --dev adds the test and lint tools and the optional extras the tests use (torchtitan,
#   torch-checkpointing);
#   --torchtitan adds torchtitan's models and trainer code (requirements-torchtitan.txt);
#   --torch-checkpointing adds engine torch_checkpointing's library
#   (requirements-torch-checkpointing.txt).
# Re-running is cheap: nothing is installed again unless a requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
reqs=requirements.txt extras=()
for arg in "$@"; do
  case "$arg" in
    --dev) reqs=requirements-dev.txt
      extras=(requirements-torchtitan.txt requirements-torch-checkpointing.txt) ;;
    --torchtitan) extras+=(requirements-torchtitan.txt) ;;
    --torch-checkpointing) extras+=(requirements-torch-checkpointing.txt) ;;
    *) echo "setup.sh: unknown option $arg (--dev, --torchtitan, --torch-checkpointing)" >&2
      exit 2 ;;
  esac
done
stamp=".venv/.installed-$(cat "$reqs" requirements.txt constraints.txt pyproject.toml "${extras[@]}" | sha256sum | cut -c1-16)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -f "$stamp" ]; then
  # torch==2.13.0 is pinned first and alone: an open range would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$reqs" -c constraints.txt
  for extra in "${extras[@]}"; do  # its own pins, without the dependencies it declares
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r "$extra"
  done
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  touch "$stamp"
fi
if [ "$reqs" = requirements-dev.txt ]; then
  # The report's browser test opens report.html in headless Chromium (Debian's package).
  command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
  # tests/test_slurm.py brings up a real single-node Slurm (scripts/slurm_up.sh): Debian's
  # munge and Slurm daemons and client, no daemon started here.
  for bin in munged slurmctld slurmd sbatch; do
    command -v "$bin" >/dev/null || {
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        munge slurmctld slurmd slurm-client
      break
    }
  done
fi
