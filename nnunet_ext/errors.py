"""The one exception type the CLI turns into a single ``nnunet-ext: error: ...`` line."""


class UserError(Exception):
    """Bad input or missing setup. The message says what is wrong and how to fix it, in one line."""
