"""``guidance-tune``: the commands (:mod:`.main`, :mod:`.study`) and what the console prints at
a study's end (:mod:`.console`)."""

from guidance_tune.cli.main import main

__all__ = ["main"]
