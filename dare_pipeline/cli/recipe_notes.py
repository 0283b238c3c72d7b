"""Settings that are valid but rarely what a user means; `recipe check` and `generate` print them."""

from __future__ import annotations


def recipe_notes(recipe) -> list[str]:
    """One line per questionable setting of `recipe`, naming its source and key."""
    g = recipe.generation
    notes = []
    if g.steps > g.gen_length:
        notes.append(f"{recipe.source}: generation.steps = {g.steps} exceeds gen_length = {g.gen_length}: with a "
                     f"fixed-step schedule some forwards commit no token (steps <= gen_length gives at least one "
                     f"token per forward)")
    return notes
