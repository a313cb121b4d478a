"""Entry point of the `omniq` command (placeholder until the CLI lands)."""

from __future__ import annotations


def main() -> None:
    print("omniq: CLI coming soon")
