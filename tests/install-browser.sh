#!/usr/bin/env bash
# The browser for the chat page's test (tests/server/test_chat_page.py): Debian's Chromium, installed with apt-get
# when it is missing and this user may (root, or sudo without a password). Elsewhere it says what to do; the test
# is then skipped (or fails, with EMBER_REQUIRE_BROWSER=1 as in CI).
set -uo pipefail
for b in chromium chromium-browser google-chrome; do
  command -v "$b" >/dev/null 2>&1 && exit 0
done
[ -n "${EMBER_CHROMIUM:-}" ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo -n"
if command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] || sudo -n true 2>/dev/null; }; then
  echo "installing Debian's chromium for the chat page's browser test" >&2
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    chromium >/dev/null && exit 0
  echo "apt-get could not install chromium" >&2
fi
echo "no Chromium: the chat page's browser test will be skipped (install chromium, or set EMBER_CHROMIUM to a" \
     "Chromium or Chrome binary)" >&2
exit 0
