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


EXCERPT = 80  # characters of a bad value quoted in a message (a pasted blob must not become the sentence)


def excerpt(value, limit: int = EXCERPT) -> str:
    """repr-like text of a value, cut to `limit` characters with the total length when cut."""
    if isinstance(value, int) and value.bit_length() > 256:  # (repr of a huge int is slow, or refused)
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())  # one line, whatever the value held
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"
