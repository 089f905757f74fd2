#!/usr/bin/env bash
# The pictures of README.md and docs/results.md, made from one run of the demo pipeline (scripts/pipeline.sh) into $OUT:
#   docs/curves.png         <- $OUT/eval/curves.png: RTO, PPO and DPPO's training curves (matplotlib)
#   docs/token_rewards.png  <- $OUT/eval/token_rewards.html, drawn by headless Chromium
#   bash scripts/docs_images.sh                       # ~2.5 min on 2 CPU cores (+ Chromium's install if missing)
#   SKIP_RUN=1 OUT=results bash scripts/docs_images.sh   # the pictures of a pipeline already run into $OUT
# Chromium comes from the system's packages (Debian: apt-get install chromium), installed here when missing and
# run as root; otherwise install it first, or set CHROMIUM to a Chrome/Chromium binary.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/docs_images}
PY=.venv/bin/python
DOCS=${DOCS:-docs}

bash scripts/install.sh  # .venv with matplotlib (requirements-plot.txt); quick when it is already there
if [ -z "${SKIP_RUN:-}" ]; then
  OUT=$OUT PY=$PY bash scripts/pipeline.sh
fi
for f in curves.png token_rewards.html; do
  [ -s "$OUT/eval/$f" ] || { echo "docs_images.sh: $OUT/eval/$f is missing (is matplotlib installed?)" >&2; exit 1; }
done

CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
if [ -z "$CHROMIUM" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "docs_images.sh: no Chromium found; install it (Debian/Ubuntu: apt-get install chromium) or set CHROMIUM" >&2
    exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  CHROMIUM=$(command -v chromium)
fi

mkdir -p "$DOCS"
cp "$OUT/eval/curves.png" "$DOCS/curves.png"
# A tall window, then the empty bottom cut off (Pillow comes with matplotlib). --no-sandbox: Chromium refuses to
# start as root otherwise; the page is our own, with no script.
SHOT=$(mktemp --suffix=.png)
trap 'rm -f "$SHOT"' EXIT
"$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
  --window-size=1100,4000 --screenshot="$SHOT" "file://$(realpath "$OUT/eval/token_rewards.html")" 2>/dev/null
$PY - "$SHOT" "$DOCS/token_rewards.png" <<'EOF'
import sys
from PIL import Image, ImageChops
page = Image.open(sys.argv[1]).convert("RGB")
box = ImageChops.difference(page, Image.new("RGB", page.size, "white")).getbbox()
if box is None:
    sys.exit("docs_images.sh: Chromium drew an empty page")
left, top, right, bottom = box
if bottom >= page.height - 1:
    print(f"docs_images.sh: the page is taller than {page.height} px; the picture is cut there", file=sys.stderr)
page.crop((max(0, left - 24), max(0, top - 24), min(page.width, right + 24), min(page.height, bottom + 24))) \
    .save(sys.argv[2], optimize=True)
EOF
echo "wrote $DOCS/curves.png and $DOCS/token_rewards.png (from $OUT)"
