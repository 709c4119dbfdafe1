"""Argument checks shared by the command lines: one clear error line, before any work."""


def require_at_least(args, minimum, *names):
    """Exits with one line if an integer option is below `minimum`; unset (None) options pass."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least {minimum}")
