"""`gptgen` commands of this area; filled in by its issue."""


def register(sub) -> None:
    """No commands yet."""
