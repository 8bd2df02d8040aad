"""Errors a user can cause. The CLI prints their message as one sentence and exits with code 2."""


class UserError(Exception):
    """A mistake in input (study file, option, data file, checkpoint) that the user can fix."""


def closest(name: str, known) -> str:
    """A 'did you mean' hint for an unknown name, or the list of known names."""
    import difflib

    known = sorted(known)
    near = difflib.get_close_matches(name, known, n=1)
    if near:
        return f"did you mean '{near[0]}'? (known: {', '.join(known)})"
    return f"known: {', '.join(known)}"
