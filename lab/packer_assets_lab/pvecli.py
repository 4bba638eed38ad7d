"""`pveum` and `pvesh` for the lab: the subcommands init-packer-remote.sh uses, on the lab's HTTPS API.

On a real node these tools act on the cluster's configuration as root. Here they call the lab's API
as root@pam (TLS verified against the lab CA), so whatever the remote script does lands in the same
stateful LabPve the API path and the tests see. Install them with `install_shims(...)`: small
wrappers that exec `<python> -m packer_assets_lab.pvecli pveum "$@"`.

Behaviour follows PVE's CLI (PVE::CLIHandler, PVE::CLIFormatter) for what is implemented: positional
arguments, then `--name value` / `--name=value` options; with `--output-format json` the API's answer
is printed as one JSON line (nothing for a null answer); errors go to stderr with exit code 255.

Configuration comes from the environment the wrappers set: PA_LAB_API_URL, PA_LAB_CA_FILE,
PA_LAB_ROOT_PASSWORD_FILE (root@pam's password, read from the file so it is never an argument), and
optionally PA_LAB_PVECLI_LOG, a file that gets one JSON line per call (program and arguments) so
tests can see what the script ran.
"""

import json
import os
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

FAIL = 255
FORMAT_OPTIONS = ("output-format", "noborder", "noheader", "human-readable", "quiet")

# (program, words) -> (HTTP method, API path template, names of the positional arguments)
COMMANDS = {
    ("pveum", "role", "add"): ("POST", "access/roles", ("roleid",)),
    ("pveum", "role", "modify"): ("PUT", "access/roles/{roleid}", ("roleid",)),
    ("pveum", "role", "list"): ("GET", "access/roles", ()),
    ("pveum", "user", "add"): ("POST", "access/users", ("userid",)),
    ("pveum", "user", "list"): ("GET", "access/users", ()),
    ("pveum", "user", "token", "add"): ("POST", "access/users/{userid}/token/{tokenid}", ("userid", "tokenid")),
    ("pveum", "user", "token", "delete"): ("DELETE", "access/users/{userid}/token/{tokenid}", ("userid", "tokenid")),
    ("pveum", "user", "token", "remove"): ("DELETE", "access/users/{userid}/token/{tokenid}", ("userid", "tokenid")),
    ("pveum", "user", "token", "list"): ("GET", "access/users/{userid}/token", ("userid",)),
    ("pveum", "acl", "modify"): ("PUT", "access/acl", ("path",)),
    ("pveum", "acl", "list"): ("GET", "access/acl", ()),
    ("pvesh", "get"): ("GET", "{api_path}", ("api_path",)),
}


class CliError(Exception):
    """A usage or API error: printed to stderr, exit 255."""


def split_args(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional arguments and options; `--opt value`, `--opt=value` and PVE's older `-opt value`."""
    positional, options = [], {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and len(arg) > 1 and not arg.lstrip("-")[:1].isdigit():
            name, eq, value = arg.lstrip("-").partition("=")
            if not eq:
                # a boolean may stand alone (PVE's getopt takes `--append` as 1)
                if i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value, i = args[i + 1], i + 1
                else:
                    value = "1"
            options[name] = value
        else:
            positional.append(arg)
        i += 1
    return positional, options


def resolve(prog: str, args: list[str]):
    for words, spec in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if words[0] == prog and tuple(args[: len(words) - 1]) == words[1:]:
            return words, spec, args[len(words) - 1 :]
    known = ", ".join(" ".join(w) for w in COMMANDS if w[0] == prog)
    raise CliError(f"lab {prog}: unknown or unimplemented command '{' '.join(args)}' (lab implements: {known})")


def connect():
    from proxmoxer import ProxmoxAPI

    url = urlsplit(os.environ["PA_LAB_API_URL"])
    password = Path(os.environ["PA_LAB_ROOT_PASSWORD_FILE"]).read_text().strip()
    return ProxmoxAPI(
        url.hostname,
        port=url.port or 8006,
        user="root@pam",
        password=password,
        backend="https",
        verify_ssl=os.environ["PA_LAB_CA_FILE"],
        timeout=30,
    )


def call(api, method: str, template: str, values: dict[str, str], options: dict[str, str]):
    """The API call: positional arguments fill the path; those the path does not use become parameters
    (`pveum role add R` is POST /access/roles roleid=R, `pveum acl modify /` is PUT /access/acl path=/)."""
    path = template.format(**values).strip("/")
    params = {name: value for name, value in values.items() if "{" + name + "}" not in template}
    params.update(options)
    return getattr(api(path), method.lower())(**params)


def render(data, output_format: str) -> str:
    if data is None:
        return ""  # PVE prints nothing for an API call that returns null
    if output_format == "json":
        return json.dumps(data, separators=(",", ":")) + "\n"
    if output_format == "json-pretty":
        return json.dumps(data, indent=4, sort_keys=True) + "\n"
    raise CliError(f"the lab's CLI prints data only with --output-format json or json-pretty, not {output_format!r}")


def log_call(prog: str, args: list[str]) -> None:
    target = os.environ.get("PA_LAB_PVECLI_LOG")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(json.dumps({"prog": prog, "argv": args}) + "\n")


def run(prog: str, args: list[str]) -> int:
    from proxmoxer.core import ResourceException

    log_call(prog, args)
    words, (method, template, names), rest = resolve(prog, args)
    positional, options = split_args(rest)
    if len(positional) != len(names):
        raise CliError(f"{' '.join(words)}: expected arguments <{'> <'.join(names)}>, got {positional}")
    output_format = options.pop("output-format", "text")
    for name in FORMAT_OPTIONS:
        options.pop(name, None)
    try:
        data = call(connect(), method, template, dict(zip(names, positional, strict=False)), options)
    except ResourceException as exc:
        if exc.errors:
            details = "".join(f"{key}: {msg}\n" for key, msg in sorted(exc.errors.items()))
            raise CliError(f"{exc.status_code} Parameter verification failed.\n{details}".rstrip()) from None
        raise CliError(str(exc.content or exc.status_message)) from None
    sys.stdout.write(render(data, output_format))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("pveum", "pvesh"):
        print("usage: python -m packer_assets_lab.pvecli pveum|pvesh ARGS...", file=sys.stderr)
        return FAIL
    try:
        return run(argv[0], argv[1:])
    except CliError as exc:
        print(str(exc), file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - a CLI reports every failure the same way, as pvesh does
        print(f"lab {argv[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return FAIL


SHIM = """#!/bin/sh
# The lab's stand-in for PVE's {prog}: packer_assets_lab.pvecli against the lab API as root@pam.
export PA_LAB_API_URL={url} PA_LAB_CA_FILE={ca} PA_LAB_ROOT_PASSWORD_FILE={password_file}
{log}exec {python} -m packer_assets_lab.pvecli {prog} "$@"
"""


def install_shims(
    bin_dir, api_url: str, ca_file, root_password_file, log_file=None, python: str = sys.executable
) -> dict[str, Path]:
    """Write executable `pveum` and `pvesh` into bin_dir; put bin_dir on the node's PATH to use them."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = f"export PA_LAB_PVECLI_LOG={shlex.quote(str(log_file))}\n" if log_file else ""
    made = {}
    for prog in ("pveum", "pvesh"):
        path = bin_dir / prog
        path.write_text(
            SHIM.format(
                prog=prog,
                url=shlex.quote(api_url),
                ca=shlex.quote(str(ca_file)),
                password_file=shlex.quote(str(root_password_file)),
                log=log,
                python=shlex.quote(python),
            )
        )
        path.chmod(0o755)
        made[prog] = path
    return made


if __name__ == "__main__":
    sys.exit(main())
