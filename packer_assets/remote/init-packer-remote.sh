#!/usr/bin/env bash
# init-packer-remote.sh: packer-assets' bootstrap for a Proxmox VE node reached over SSH only.
#
# packer_assets/pve/ssh.py uploads this file over SFTP, runs it as root on the node and removes it.
# It does what the API path (packer_assets/pve/bootstrap.py) does, with pveum and pvesh, in the same
# order: discover everything first (so a bad setting changes nothing), then ensure the role, the user,
# the user's ACL on /, the API token and (privilege separation) the token's ACL on /.
#
# Inputs, all from the environment (the caller passes them as `env NAME=value ... bash <this file>`;
# none is secret: root on the node needs no credentials):
#   PA_USER PA_ROLE PA_TOKEN    automation user (name@realm), role, token name
#   PA_PRIVS                    privileges the role must hold, exactly (comma list; PVE >= 9)
#   PA_PRIVS_PRE9               the same for PVE < 9 (default: PA_PRIVS)
#   PA_PRIVSEP                  1 (default): token with privilege separation and its own ACL; 0: user's rights
#   PA_NODE PA_VM_STORAGE PA_ISO_STORAGE PA_BRIDGE    settings that win over discovery (must qualify)
#   SKIP_TOKEN_GEN=1            the caller holds a working secret: leave an existing token alone
#   PA_ROTATE=1                 replace the token even though it exists
#   PVE_ROOT_CA                 the CA certificate to hand back (default /etc/pve/pve-root-ca.pem)
#
# Output on stdout: progress lines for the log, and machine-readable lines
#   EXPORT:NAME=value
# A value is always one line without CR/LF (the script checks). Names ending in _B64 carry base64
# without line wrapping (used for the CA certificate, which has newlines). Names:
#   PVE_VERSION NODE NODE_IP(absent if the node has none in /cluster/status) VM_STORAGE ISO_STORAGE
#   BRIDGE PRIVILEGES TOKEN_ID TOKEN_ACTION(reused|created|replaced|rotated)
#   TOKEN_SECRET(only when a token was made, printed at once so a later failure cannot lose it)
#   CA_PEM_B64  CHANGE(repeated: one per change made)  DONE=1 (the last line of a complete run)
# Nothing secret goes to stderr, a command line or a file: the token secret lives in a shell variable
# and leaves only through stdout.
#
# Exit codes: 0 done; 2 bad input; 3 pveum/pvesh missing (not a PVE node); 4 discovery found no
# usable node/storage/bridge or no CA; 5 a pveum/pvesh call failed (its own message is on stderr).
set -euo pipefail
umask 077

STEP="start"
die() { local code=$1; shift; printf 'init-packer-remote: %s\n' "$*" >&2; exit "$code"; }
trap 'rc=$?; [ "$rc" -eq 0 ] || printf "init-packer-remote: stopped in step: %s (exit %s)\n" "$STEP" "$rc" >&2' EXIT

emit() {  # emit NAME VALUE: one EXPORT line; a line break would break the protocol, so refuse it
  case $2 in *$'\n'* | *$'\r'*) die 5 "internal: value of $1 has a line break" ;; esac
  printf 'EXPORT:%s=%s\n' "$1" "$2"
}
change() { emit CHANGE "$1"; }
say() { printf '%s\n' "$*"; }

# pveum/pvesh with their failure turned into exit 5 naming the command (its stderr passes through).
pve() {
  local out
  out=$("$@") || die 5 "'$*' failed (exit $?)"
  printf '%s' "$out"
}

# JSON queries with core Perl (JSON::PP): Perl is always on a PVE node (PVE is written in it), jq is
# not. Reads JSON on stdin; prints the answer; exit 4 with a message naming the setting on a miss.
read -r -d '' QUERIES <<'PERL' || true
use strict; use warnings; use JSON::PP;
my ($what, @arg) = @ARGV;
my $in = do { local $/; <STDIN> };
my $data = JSON::PP->new->allow_nonref->decode($in eq '' ? 'null' : $in);
sub plist { '[' . join(', ', map { "'$_'" } @_) . ']' }
sub miss { print STDERR "init-packer-remote: $_[0]\n"; exit 4 }
# The rule of bootstrap.py's _pick: a configured name must be usable; else the first usable one.
sub pick {
    my ($kind, $wanted, $usable, $all) = @_;
    if ($wanted ne '') {
        return $wanted if grep { $_ eq $wanted } @$usable;
        my $why = (grep { $_ eq $wanted } @$all) ? 'exists but does not qualify' : 'does not exist';
        miss("configured $kind '$wanted' $why (usable: " . (join(', ', @$usable) || 'none') . ")");
    }
    miss("no usable $kind found (seen: " . (join(', ', @$all) || 'none') . "); configure one") unless @$usable;
    return $usable->[0];
}
if ($what eq 'field') {
    my $v = $data->{$arg[0]};
    print defined $v ? $v : '';
} elsif ($what eq 'node') {
    my ($wanted, $host) = @arg;
    my @all = sort map { $_->{node} } @$data;
    my @online = sort map { $_->{node} } grep { ($_->{status} // '') eq 'online' } @$data;
    if ($wanted eq '' && grep { $_ eq $host } @online) { print $host; exit 0 }
    miss("several nodes are online (" . join(', ', @online) . ") and none is this host ($host): set the node")
        if $wanted eq '' && @online > 1;
    print pick('node', $wanted, \@online, \@all);
} elsif ($what eq 'node_ip') {
    my ($node) = @arg;
    for my $e (@$data) {
        if (($e->{type} // '') eq 'node' && ($e->{name} // '') eq $node && $e->{ip}) { print $e->{ip}; last }
    }
} elsif ($what eq 'storage') {
    my ($node, $content, $wanted) = @arg;
    my @all = sort map { $_->{storage} } @$data;
    # enabled, active and holding this content; most free space first (what a human picks on a fresh node)
    my @usable = map { $_->{storage} }
        sort { ($b->{avail} // 0) <=> ($a->{avail} // 0) or $a->{storage} cmp $b->{storage} }
        grep { ($_->{enabled} // 1) && $_->{active} && grep { $_ eq $content } split /,/, ($_->{content} // '') }
        @$data;
    my $kind = $content eq 'images' ? 'VM storage (content images)' : 'ISO storage (content iso)';
    print pick("$kind on node $node", $wanted, \@usable, \@all);
} elsif ($what eq 'bridge') {
    my ($node, $wanted) = @arg;
    my @all = sort map { $_->{iface} } @$data;
    my @active = sort map { $_->{iface} } grep { $_->{active} } @$data;
    if ($wanted eq '' && grep { $_ eq 'vmbr0' } @active) { print 'vmbr0'; exit 0 }
    print pick("bridge on node $node", $wanted, $wanted eq '' ? \@active : \@all, \@all);
} elsif ($what eq 'role') {
    # "missing", "same", or the change text for a role whose privileges differ
    my ($role, $privs) = @arg;
    my ($r) = grep { $_->{roleid} eq $role } @$data;
    if (!$r) { print 'missing'; exit 0 }
    my %want = map { $_ => 1 } grep { length } split /,/, $privs;
    my %have = map { $_ => 1 } grep { length } split /,/, ($r->{privs} // '');
    my @missing = sort grep { !$have{$_} } keys %want;
    my @extra = sort grep { !$want{$_} } keys %have;
    print((@missing || @extra)
        ? "set role $role privileges (was missing " . plist(@missing) . ", had extra " . plist(@extra) . ")"
        : 'same');
} elsif ($what eq 'has') {
    # has KEY VALUE [KEY VALUE ...]: "yes" if some entry of the list matches all pairs
    my %want = @arg;
    for my $e (@$data) {
        if (!grep { ($e->{$_} // '') ne $want{$_} } keys %want) { print 'yes'; exit 0 }
    }
    print 'no';
} else {
    die "unknown query $what\n";
}
PERL
json() { perl -e "$QUERIES" -- "$@"; }
# q DATA QUERY ARGS...: query JSON held in a variable. A pipe from the printf builtin, not a here-string
# (bash may back those with a temp file) and not an argument: the token answer passes through here too.
q() { printf '%s' "$1" | json "${@:2}"; }

# ------------------------------------------------------------------ inputs

STEP="check inputs"
PA_USER=${PA_USER:-automation@pve}
PA_ROLE=${PA_ROLE:-PackerBuilder}
PA_TOKEN=${PA_TOKEN:-packer}
PA_PRIVS=${PA_PRIVS:-}
PA_PRIVS_PRE9=${PA_PRIVS_PRE9:-$PA_PRIVS}
PA_PRIVSEP=${PA_PRIVSEP:-1}
PA_NODE=${PA_NODE:-}
PA_VM_STORAGE=${PA_VM_STORAGE:-}
PA_ISO_STORAGE=${PA_ISO_STORAGE:-}
PA_BRIDGE=${PA_BRIDGE:-}
SKIP_TOKEN_GEN=${SKIP_TOKEN_GEN:-0}
PA_ROTATE=${PA_ROTATE:-0}
CA_FILE=${PVE_ROOT_CA:-/etc/pve/pve-root-ca.pem}

# PVE's own formats (pve-userid, pve-tokenid, role ids, privilege names): checked here so no odd
# character reaches a command or an EXPORT line.
[[ $PA_USER =~ ^[^[:space:]:/@]+@[A-Za-z][A-Za-z0-9._-]+$ ]] || die 2 "PA_USER '$PA_USER' is not name@realm"
[[ $PA_TOKEN =~ ^[A-Za-z][A-Za-z0-9._-]+$ ]] || die 2 "PA_TOKEN '$PA_TOKEN' is not a valid token name"
[[ $PA_ROLE =~ ^[A-Za-z0-9._-]+$ ]] || die 2 "PA_ROLE '$PA_ROLE' is not a valid role id"
for privs in "$PA_PRIVS" "$PA_PRIVS_PRE9"; do
  [[ $privs =~ ^[A-Za-z.]+(,[A-Za-z.]+)*$ ]] || die 2 "PA_PRIVS/PA_PRIVS_PRE9 must be a comma list of privileges"
done
for name in PA_NODE PA_VM_STORAGE PA_ISO_STORAGE PA_BRIDGE; do
  [[ ${!name} =~ ^[A-Za-z0-9._-]*$ ]] || die 2 "$name '${!name}' is not a valid name"
done
for name in PA_PRIVSEP SKIP_TOKEN_GEN PA_ROTATE; do
  [[ ${!name} =~ ^[01]$ ]] || die 2 "$name must be 0 or 1"
done
TOKEN_ID="$PA_USER!$PA_TOKEN"

STEP="check tools"
for tool in pveum pvesh; do
  command -v "$tool" >/dev/null 2>&1 || die 3 "$tool not found on PATH ($PATH): is this a Proxmox VE node?"
done
command -v perl >/dev/null 2>&1 || die 3 "perl not found: is this a Proxmox VE node?"

# ------------------------------------------------------------------ discovery (no changes yet)

STEP="discover"
# Each answer is fetched first and queried second: a failing pvesh then stops the script with its own
# message and exit 5, instead of a JSON parse error further down the pipe.
answer=$(pve pvesh get /version --output-format json)
PVE_VERSION=$(q "$answer" field version)
[[ $PVE_VERSION =~ ^[0-9]+ ]] || die 4 "cannot read the PVE version from /version ('$PVE_VERSION')"
PRIVS=$PA_PRIVS
[ "${PVE_VERSION%%.*}" -ge 9 ] || PRIVS=$PA_PRIVS_PRE9

host=$(uname -n)
answer=$(pve pvesh get /nodes --output-format json)
NODE=$(q "$answer" node "$PA_NODE" "${host%%.*}")
answer=$(pve pvesh get /cluster/status --output-format json)
NODE_IP=$(q "$answer" node_ip "$NODE")
answer=$(pve pvesh get "/nodes/$NODE/storage" --output-format json)
VM_STORAGE=$(q "$answer" storage "$NODE" images "$PA_VM_STORAGE")
ISO_STORAGE=$(q "$answer" storage "$NODE" iso "$PA_ISO_STORAGE")
answer=$(pve pvesh get "/nodes/$NODE/network" --type any_bridge --output-format json)
BRIDGE=$(q "$answer" bridge "$NODE" "$PA_BRIDGE")

[ -r "$CA_FILE" ] || die 4 "cannot read the CA certificate $CA_FILE"
grep -q -- '-----BEGIN CERTIFICATE-----' "$CA_FILE" || die 4 "$CA_FILE holds no PEM certificate"
CA_B64=$(base64 -w0 <"$CA_FILE")

say "PVE $PVE_VERSION, node $NODE${NODE_IP:+ ($NODE_IP)}: VM storage $VM_STORAGE, ISO storage $ISO_STORAGE, bridge $BRIDGE"
emit PVE_VERSION "$PVE_VERSION"
emit NODE "$NODE"
[ -z "$NODE_IP" ] || emit NODE_IP "$NODE_IP"
emit VM_STORAGE "$VM_STORAGE"
emit ISO_STORAGE "$ISO_STORAGE"
emit BRIDGE "$BRIDGE"
emit PRIVILEGES "$PRIVS"
emit CA_PEM_B64 "$CA_B64"

# ------------------------------------------------------------------ access objects

STEP="role $PA_ROLE"
answer=$(pve pveum role list --output-format json)
state=$(q "$answer" role "$PA_ROLE" "$PRIVS")
case $state in
  missing) pve pveum role add "$PA_ROLE" --privs "$PRIVS" >/dev/null; change "created role $PA_ROLE" ;;
  same) say "role $PA_ROLE has the privileges already" ;;
  # without --append, modify sets the list: exactly these privileges
  *) pve pveum role modify "$PA_ROLE" --privs "$PRIVS" >/dev/null; change "$state" ;;
esac

STEP="user $PA_USER"
answer=$(pve pveum user list --output-format json)
if [ "$(q "$answer" has userid "$PA_USER")" = no ]; then
  pve pveum user add "$PA_USER" --comment "packer-assets automation (templates)" >/dev/null
  change "created user $PA_USER"
fi

ensure_acl() {  # ensure_acl TYPE UGID: the role on / for a user or token, propagating
  local kind=$1 ugid=$2 acls
  acls=$(pve pveum acl list --output-format json)
  if [ "$(q "$acls" has path / roleid "$PA_ROLE" type "$kind" ugid "$ugid")" = no ]; then
    pve pveum acl modify / --roles "$PA_ROLE" "--${kind}s" "$ugid" --propagate 1 >/dev/null
    change "granted $PA_ROLE on / to $kind $ugid"
  fi
}
STEP="ACL of user $PA_USER"
ensure_acl user "$PA_USER"

STEP="token $TOKEN_ID"
answer=$(pve pveum user token list "$PA_USER" --output-format json)
exists=$(q "$answer" has tokenid "$PA_TOKEN")
if [ "$exists" = yes ] && [ "$SKIP_TOKEN_GEN" = 1 ] && [ "$PA_ROTATE" = 0 ]; then
  ACTION=reused
  say "token $TOKEN_ID kept (SKIP_TOKEN_GEN=1: the caller's secret works)"
else
  if [ "$exists" = yes ]; then
    pve pveum user token remove "$PA_USER" "$PA_TOKEN" >/dev/null
    if [ "$PA_ROTATE" = 1 ]; then ACTION=rotated; else ACTION=replaced; fi
  else
    ACTION=created
  fi
  created=$(pve pveum user token add "$PA_USER" "$PA_TOKEN" --privsep "$PA_PRIVSEP" \
    --comment "packer-assets builds (made by proxmox_env over SSH)" --output-format json)
  secret=$(q "$created" field value)
  unset created
  [ -n "$secret" ] || die 5 "pveum user token add printed no token value"
  emit TOKEN_SECRET "$secret"
  unset secret
  change "$ACTION token $TOKEN_ID"
fi
emit TOKEN_ID "$TOKEN_ID"
emit TOKEN_ACTION "$ACTION"

if [ "$PA_PRIVSEP" = 1 ]; then
  STEP="ACL of token $TOKEN_ID"
  ensure_acl token "$TOKEN_ID"
fi

STEP="done"
emit DONE 1
