"""The test suite (a package, so that `tests.*` is this directory even where another installed
distribution ships a top-level `tests` package, as verl and OpenRLHF do)."""
