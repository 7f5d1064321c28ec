"""The chaos run: thousands of tracks through the whole product while overlapping faults are
injected at random, and a checker over the whole history (``make chaos``; docs/chaos.md)."""
