


def dispatch(handlers: dict, args) -> int:
    """Run the chosen sub-command; an expected user error becomes one line and exit code 2."""
    import sys

    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
