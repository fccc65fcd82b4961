#!/usr/bin/env bash
# The Debian packages the project reads from outside the repo and its venv (pipeline/system_files.py
# names the file each one provides; tests/test_system_files.py checks that the two agree). Fonts are
# pinned: they decide the bytes of rendered captchas. `make install` runs this; as root with apt-get
# it installs what is missing, elsewhere it says what to install and carries on.
set -euo pipefail
PACKAGES=(
  fonts-dejavu-core=2.37-6
  fonts-dejavu-extra=2.37-6
  fonts-liberation=1:1.07.4-11
  chromium          # the labelling page's browser test; unpinned: security updates replace it
  chromium-driver
)
missing=()
for spec in "${PACKAGES[@]}"; do
  name=${spec%%=*}
  want=${spec#"$name"}
  want=${want#=}
  have=$(dpkg-query -W -f='${Status}|${Version}' "$name" 2>/dev/null || true)
  if [[ $have != "install ok installed|"* ]] || [[ -n $want && ${have#*|} != "$want" ]]; then
    missing+=("$spec")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "set-up: installing Debian packages: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades "${missing[@]}" >/dev/null
  exit 0
fi
echo "set-up: missing Debian packages: ${missing[*]}" >&2
echo "set-up: install them (sudo apt-get install ${missing[*]}); until then the yardstick, the mixed style" \
     "and the browser test cannot run" >&2
