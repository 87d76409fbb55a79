"""Local Nix operations, one function each, using only commands Nix 2.8 already has."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet import flakeref, process
from fleet.errors import DeclarationError, NixError, UsageError

if TYPE_CHECKING:
    from fleet.ssh import Remote

# Flakes are enabled per call: the operator's nix.conf is theirs, not ours.
NIX = ("nix", "--extra-experimental-features", "nix-command flakes")


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    return env


# What the operator may type. Every value reaches a command line (ours, and over ssh a
# build host's): names are plain words, no value holds a newline or NUL, and nothing that
# stands alone as an argument starts with `-`, which a program would read as an option.
_SETTING = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_INPUT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_/-]*")
_MAX_JOBS = re.compile(r"auto|[0-9]{1,6}")
# Nix's warning for an --override-input naming no input of the flake (a typo, most likely).
_UNMATCHED_INPUT = re.compile(r"the flag '--override-input (\S+) ")


def _value(flag: str, value: str) -> None:
    if "\n" in value or "\r" in value or "\0" in value:
        raise UsageError(f"{flag}: {value!r}: a value may not hold a newline or NUL")


@dataclass(frozen=True)
class NixArgs:
    """The Nix options of the command line, given alike to every Nix command that takes them.

    Only the operator sets them, by typing them: never the flake (every flake command gets
    ``--option accept-flake-config false`` before the operator's own options, so a flake's
    ``nixConfig`` is ignored unless the operator passes ``--option accept-flake-config
    true``), and never a checkout's fleet.yaml (which has no key for them). Settings that
    weaken Nix's own safeguards (``sandbox``, ``allowed-uris``, ``substituters``,
    ``trusted-public-keys``, the build hooks...) are passed as typed: the operator may
    already set any of them in nix.conf, and Nix's daemon ignores from an untrusted user
    what it does not allow. Invalid values raise UsageError (exit 2) on construction.
    """

    options: tuple[tuple[str, str], ...] = ()  # --option NAME VALUE, in order
    override_inputs: tuple[tuple[str, str], ...] = ()  # --override-input INPUT REF
    show_trace: bool = False
    max_jobs: str | None = None  # a number or "auto": builds only
    builders: str | None = None  # Nix's builders setting: builds only

    def __post_init__(self) -> None:
        for name, value in self.options:
            if not _SETTING.fullmatch(name):
                raise UsageError(
                    f"--option {name!r}: a setting's name is letters, digits and '-', "
                    "not starting with '-'"
                )
            _value(f"--option {name}", value)
        for path, ref in self.override_inputs:
            if not _INPUT.fullmatch(path):
                raise UsageError(
                    f"--override-input {path!r}: an input is letters, digits, '_', '-' and "
                    "'/' between nested inputs, not starting with '-' or '/'"
                )
            _value(f"--override-input {path}", ref)
            if not ref or ref.startswith("-"):
                raise UsageError(
                    f"--override-input {path} {ref!r}: expected a flake reference, "
                    "not empty and not starting with '-'"
                )
        if self.max_jobs is not None and not _MAX_JOBS.fullmatch(self.max_jobs):
            raise UsageError(f"--max-jobs {self.max_jobs!r}: expected a number or 'auto'")
        if self.builders is not None:
            _value("--builders", self.builders)

    def flake_argv(self) -> list[str]:
        """For ``nix`` flake commands (eval, flake metadata): settings, input overrides,
        the trace. A flake's own ``nixConfig`` never applies unless the operator says so."""
        argv = ["--option", "accept-flake-config", "false"]
        argv += [a for name, value in self.options for a in ("--option", name, value)]
        argv += [a for path, ref in self.override_inputs for a in ("--override-input", path, ref)]
        return argv + (["--show-trace"] if self.show_trace else [])

    def build_argv(self) -> list[str]:
        """For ``nix-store --realise``, here or on a build host: settings, --max-jobs and
        the builders (nix-store takes them only as a setting); it has no flake inputs."""
        argv = [a for name, value in self.options for a in ("--option", name, value)]
        argv += [] if self.max_jobs is None else ["--max-jobs", self.max_jobs]
        return argv + ([] if self.builders is None else ["--option", "builders", self.builders])


# The command line's Nix options; the CLI sets them (configure) before any Nix command runs.
ARGS = NixArgs()


def configure(args: NixArgs) -> None:
    """Give every later Nix command of this process these options."""
    global ARGS
    ARGS = args


def evaluate(argv: Sequence[str], what: str, flake: str) -> process.Result:
    """A ``nix eval``: its failure is the declaration's (exit 2), in full (every problem,
    file and hint in one line; with --show-trace, Nix's own lines). An --override-input
    that names no input of the flake is bad input too: Nix only warns of it."""
    result = process.run([*argv, *ARGS.flake_argv()], check=False)
    if result.ok:
        typed = {path for path, _ref in ARGS.override_inputs}
        for path in _UNMATCHED_INPUT.findall(result.stderr):
            if path in typed:
                raise UsageError(f"--override-input {path}: {flake} has no such input")
        return result
    if ARGS.show_trace:
        raise DeclarationError(f"{what}:\n{result.stderr.rstrip()}")
    text = result.error_text()
    root = flakeref.root(flake)
    if "No such file or directory" in text and root is not None and (root / ".git").exists():
        text += (
            " (a flake in a git repository sees only the files git tracks: `git add` the"
            " file, even uncommitted)"
        )
    raise DeclarationError(f"{what}: {text}")


def eval_json(flake: str, attribute: str) -> Any:
    """``nix eval --json FLAKE#ATTR``, decoded."""
    what = f"nix eval {flake}#{attribute}"
    result = evaluate([*NIX, "eval", "--json", f"{flake}#{attribute}"], what, flake)
    try:
        return json.loads(result.stdout)
    except ValueError as exc:
        # Nix writes a float out of range, or not a number, as a bare inf or nan.
        raise DeclarationError(
            f"{what}: not JSON ({exc}): is a number infinite or not a number?"
        ) from None


def eval_inventory(flake: str) -> Any:
    """The flake's ``fleet`` output.

    Nix looks an installable up under ``packages.<system>`` first, so a flake that also
    ships the tool as ``packages.<system>.fleet`` hides its inventory from ``FLAKE#fleet``.
    The inventory's own fields are missing from a package, and Nix falls through to the
    top-level output for them.
    """
    data = eval_json(flake, "fleet")
    if isinstance(data, dict):
        return data
    return {key: eval_json(flake, f"fleet.{key}") for key in ("schemaVersion", "hosts", "deploy")}


def nix_string(text: str) -> str:
    """A Nix string literal holding exactly ``text``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    return f'"{escaped}"'


# Maps the selected hosts' configurations to their system's derivation and output paths.
_SYSTEMS = """configurations:
  let wanted = builtins.fromJSON {names};
  in builtins.mapAttrs (name: c: {{
    drv = c.config.system.build.toplevel.drvPath;
    out = c.config.system.build.toplevel.outPath;
  }}) (builtins.intersectAttrs wanted configurations)
"""


@dataclass(frozen=True)
class System:
    """One host's system as evaluated: what builds it, and what it builds."""

    drv: str
    out: str


def evaluate_systems(
    flake: str, hosts: Sequence[str], options: Mapping[str, str] | None = None
) -> dict[str, System]:
    """Every host's system in one evaluation, in the order of ``hosts``.

    Evaluating gives each host its derivation and output path by name (the order of a
    multi-installable ``nix build`` says nothing about which result is whose), and
    ``nix-store --realise``, in every Nix version, builds them without evaluating again.
    """
    names = json.dumps({h: None for h in hosts})
    apply = _SYSTEMS.format(names=nix_string(names))
    result = evaluate(
        [*NIX, "eval", *_options(options or {}), "--json", f"{flake}#nixosConfigurations",
         "--apply", apply],
        "nix eval of the systems",
        flake,
    )  # fmt: skip
    systems: dict[str, dict[str, str]] = json.loads(result.stdout)
    missing = [h for h in hosts if h not in systems]
    if missing:
        raise DeclarationError(f"{flake}: no nixosConfigurations for {', '.join(missing)}")
    return {h: System(systems[h]["drv"], systems[h]["out"]) for h in hosts}


def realise_argv(drvs: Sequence[str], options: Mapping[str, str] | None = None) -> list[str]:
    """``nix-store --realise`` of the derivations, with the command line's build options."""
    return ["nix-store", *_options(options or {}), *ARGS.build_argv(), "--realise",
            *sorted(set(drvs))]  # fmt: skip


def build_systems(
    flake: str, hosts: Sequence[str], options: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Build the hosts' systems here: one evaluation, then one build of every derivation."""
    systems = evaluate_systems(flake, hosts, options)
    process.run(realise_argv([s.drv for s in systems.values()], options),
                error=NixError, what="nix build")  # fmt: skip
    return {h: s.out for h, s in systems.items()}


def build_on(remote: Remote, systems: Mapping[str, System]) -> dict[str, str]:
    """Build evaluated systems on a build host, as ``nixos-rebuild --build-host`` does: copy
    the derivations there, realise them there (with the command line's build options),
    then bring the outputs back here once. Evaluation stays here: the build host needs no
    flake, and its word is taken for what the derivations build, nothing else."""
    from fleet import ssh  # the laptop's builds never load it

    drvs = sorted({s.drv for s in systems.values()})
    copy_closure(remote, *drvs)
    try:
        remote.run(realise_argv(drvs))
    except ssh.RemoteCommandError as exc:
        raise NixError(f"nix build on {remote.name}: {exc.result.last_error_line()}") from exc
    fetch_closure(remote, *sorted({s.out for s in systems.values()}))
    return {h: s.out for h, s in systems.items()}


def _options(options: Mapping[str, str]) -> list[str]:
    return [arg for key, value in options.items() for arg in ("--option", key, value)]


def sign(paths: Sequence[str], key_file: str) -> None:
    """Sign closures with the fleet's key, so that hosts whose deploy user Nix does not trust
    accept them (``nix store sign``: the operator must be root or a trusted Nix user)."""
    if not paths:
        return
    process.run(
        [*NIX, "store", "sign", "--key-file", key_file, "--recursive", "--", *sorted(set(paths))],
        error=NixError,
        what="nix store sign",
    )


SIGNATURE_HINT = (
    "the host's deploy user is not trusted by Nix, so the closure must be signed by a key "
    "in the host's fleet.trustedPublicKeys: set signingKey in the operator's config"
)


def copy_argv(address: str, paths: Sequence[str], *, substitute: bool = False) -> list[str]:
    """``nix-copy-closure --to`` the host; ``substitute``: the host first fetches what it
    can from its own substituters (``--use-substitutes``), the rest comes from here."""
    use = ["--use-substitutes"] if substitute else []
    return ["nix-copy-closure", "--to", *use, address, *paths]


def copy_closure(remote: Remote, *paths: str, substitute: bool = False) -> None:
    """Copy closures to a host through the transport's connection and host-key policy."""
    try:
        _copy(remote, copy_argv(remote.endpoint.address, paths, substitute=substitute),
              f"{remote.name}: copy of {' '.join(paths)}")  # fmt: skip
    except NixError as exc:
        # "lacks a valid signature" (Nix 2.8), "lacks a signature by a trusted key" (later).
        if re.search(r"lacks a (valid )?signature", str(exc)):
            raise NixError(f"{exc} ({SIGNATURE_HINT})") from exc
        raise


def fetch_closure(remote: Remote, *paths: str) -> None:
    """Copy closures from a host into this machine's store (``nix-copy-closure --from``)."""
    _copy(remote, ["nix-copy-closure", "--from", remote.endpoint.address, *paths],
          f"{remote.name}: copy back of {' '.join(paths)}")  # fmt: skip


def _copy(remote: Remote, argv: Sequence[str], what: str) -> None:
    with remote.session():
        process.run(
            argv, env=_env({"NIX_SSHOPTS": remote.nix_sshopts()}), error=NixError, what=what
        )


def copy_to_root(root: Path, path: str) -> None:
    """Copy a closure into the store of a chroot (``ROOT/nix/store``): how the lab seeds hosts."""
    process.run(
        [*NIX, "copy", "--no-check-sigs", "--to", f"local?root={root}", path],
        error=NixError,
        what=f"nix copy to {root}",
    )


def flake_metadata(flake: str) -> dict[str, Any]:
    """``nix flake metadata --json``: the locked revision, when the flake has one."""
    result = process.run(
        [*NIX, "flake", "metadata", "--json", *ARGS.flake_argv(), flake],
        error=NixError,
        what=f"nix flake metadata {flake}",
    )
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def closure(path: str) -> list[str]:
    """Every store path ``path`` depends on, itself included (``nix-store -qR``)."""
    result = process.run(["nix-store", "-qR", path], error=NixError, what=f"nix-store -qR {path}")
    return result.stdout.split()
