#!/usr/bin/env bash
# Set-up of the caption-stream benchmarks (not of clipcl's default setup.sh): Debian's two captioned
# drawing sets, Tux Paint's stamps (/usr/share/tuxpaint/stamps) and the Open Clip Art Library
# (/usr/share/openclipart/svg), and the emoji set's three packages. See docs/datasets.md, "Caption sets".
set -euo pipefail

packages=()
[ -d /usr/share/tuxpaint/stamps ] || packages+=(tuxpaint-stamps-default)
[ -d /usr/share/openclipart/svg ] || packages+=(openclipart-svg)
# The emoji set (rendered glyphs with CLDR names and Emoji versions; docs/multilingual.md).
[ -f /usr/share/unicode/emoji/emoji-test.txt ] || packages+=(unicode-data)
[ -d /usr/share/unicode/cldr/common/annotations ] || packages+=(unicode-cldr-core)
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || packages+=(fonts-noto-color-emoji)
if [ ${#packages[@]} -eq 0 ]; then
  echo "setup_captions.sh: the caption sets' Debian packages are installed"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== installing ${packages[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
else
  echo "setup_captions.sh: run 'sudo apt-get install ${packages[*]}' (needs root and apt-get)" >&2
  exit 1
fi
