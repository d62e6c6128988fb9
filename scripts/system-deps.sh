#!/usr/bin/env bash
# Debian packages the project uses: Fashion-MNIST (dataset-fashion-mnist), chromium (the headless check of the run
# report, tests/test_report.py). Installed when missing and we are root
# (or have sudo); otherwise a note is printed and the features that need it skip with a reason.
set -u
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
  echo "note: missing Debian packages ${need[*]} (not root); Fashion-MNIST features and the report browser check will be unavailable"; exit 0; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null 2>&1 && \
  $SUDO apt-get install -y -q "${need[@]}" >/dev/null 2>&1; } || echo "note: could not install ${need[*]}"
exit 0
