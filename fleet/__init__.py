"""Deploy NixOS configurations to a fleet of hosts with health-gated, atomic rollback."""

__version__ = "0.1.0"
