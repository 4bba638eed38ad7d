#!/usr/bin/env bash
# Make sure Debian packages are installed: `tools/system-packages.sh PACKAGE...`
#
# Each package is looked for by a file it installs (so a packer from elsewhere on PATH counts too).
# As root with apt-get, what is missing is installed (one `apt-get update`, one `apt-get install`);
# otherwise this stops with one message naming what is missing and the command that installs it.
set -euo pipefail

# package -> how to tell it is there
probe() {
  case "$1" in
    packer)          command -v packer ;;
    openssh-server)  [ -x /usr/sbin/sshd ] ;;
    openssh-client)  command -v ssh && command -v scp && command -v ssh-keygen ;;
    debconf)         command -v debconf-set-selections ;;
    gnupg)           command -v gpg && command -v gpgconf ;;
    postgresql)      compgen -G '/usr/lib/postgresql/*/bin/initdb' ;;
    chromium)        command -v chromium ;;
    chromium-driver) command -v chromedriver ;;
    python3-venv)    python3 -c 'import ensurepip, venv' ;;
    *)               dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed' ;;
  esac
}

missing=()
for pkg in "$@"; do
  probe "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}"
  exit 0
fi
echo "missing system packages: ${missing[*]}" >&2
echo "install them with: sudo apt-get install -y ${missing[*]}   (or run this as root: it installs them itself)" >&2
exit 1
