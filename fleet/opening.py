"""Opening the fleet's flake for a command: the reference resolved and checked (exit 2
before Nix is asked), the operator's config read, and the inventory's evaluation started
at once, in the background. Light on purpose: the command line starts it before it loads
the core a command runs, so Nix evaluates while Python imports."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fleet import config, flakeref, nix
from fleet.errors import DeclarationError


@dataclass(frozen=True)
class Opening:
    """A flake being opened: where it is, how errors name it, the config, and its
    inventory on the way."""

    ref: str
    named: str
    config: config.Config
    evaluation: Future[Any]

    def inventory(self) -> Any:
        """The ``fleet`` output as Nix evaluated it; an error names the flake as the
        operator gave it, with what to do when Nix's own words do not say."""
        try:
            return self.evaluation.result()
        except DeclarationError as exc:
            if flakeref.missing_output(str(exc)):
                raise DeclarationError(f"{self.named}: {flakeref.MISSING_OUTPUT}") from exc
            hint = flakeref.registry_hint(self.ref)
            if hint:
                raise DeclarationError(f"{exc}{hint}") from exc
            raise


def start(flake: str | None) -> Opening:
    """Resolve and check ``flake`` (the typed --flake, else the config's, else "."), read
    the operator's config, and start evaluating the inventory."""
    user_config = config.load_user()
    ref = flake or user_config.get("flake") or "."
    named = _named(ref, typed=bool(flake), user_config=user_config)
    flakeref.check(ref, named)
    cfg = config.load(ref, user_config)
    pool = ThreadPoolExecutor(1, thread_name_prefix="fleet-inventory")
    try:
        evaluation = pool.submit(nix.eval_inventory, ref)
    finally:
        pool.shutdown(wait=False)
    return Opening(ref, named, cfg, evaluation)


def _named(ref: str, typed: bool, user_config: config.Config) -> str:
    """How an error names the flake: as typed, else where it came from."""
    if typed:
        return f"--flake {ref}"
    if user_config.get("flake"):
        return f"flake {ref} (from {user_config.sources[0]})"
    return f"--flake {ref} (the default)"
