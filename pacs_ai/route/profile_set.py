"""The profiles directory as the running service sees it: reloaded when a file changes.

Both the scheduler (routing) and the report pipeline (which drafter a study's
profiles name) read profiles through one :class:`ProfileSet`, so it lives
below both of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pacs_ai.route.profiles import Profile, ProfileError, load_profiles
from pacs_ai.route.rules import RulesError, RuleSet, find_rules_file, load_rules

log = logging.getLogger(__name__)


class ProfileSet:
    """The profiles directory, reloaded when a file changes; a broken edit keeps the last good set."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp: tuple[tuple[str, float], ...] | None = None
        self.profiles: list[Profile] = []
        #: The routing rules next to the profiles; None when there is no rules file (profiles decide).
        self.rules: RuleSet | None = None
        self.refresh()

    def _current_stamp(self) -> tuple[tuple[str, float], ...]:
        files = sorted([*self.directory.glob("*.yaml"), *self.directory.glob("*.yml")])
        return tuple((str(path), path.stat().st_mtime) for path in files)

    def refresh(self) -> list[Profile]:
        stamp = self._current_stamp()
        if stamp != self._stamp:
            try:
                profiles = load_profiles(self.directory)
                rules_file = find_rules_file(self.directory)
                self.rules = load_rules(rules_file) if rules_file is not None else None
                self.profiles = profiles
                if self.rules is not None:
                    log.info("routing by %d rule(s) from %s", len(self.rules.rules), rules_file)
                log.info(
                    "loaded %d profile(s) from %s: %s",
                    len(self.profiles),
                    self.directory,
                    ", ".join(p.name for p in self.profiles) or "none",
                )
            except (ProfileError, RulesError) as exc:
                if self._stamp is None:
                    raise
                log.error("profile or rule change rejected, keeping the previous ones:\n%s", exc)
            self._stamp = stamp
        return self.profiles
